//! Replay plans (SPEC §7 "Console", `dlq plan`): which dead letters a replay would move, what
//! each would do once back in the queue, and how long it takes under the rate budget. A plan
//! is saved (one JSON file per plan beside the store, `<store.path>.plans/`), so the console
//! and `dlq replay --plan ID` apply exactly what was shown; applying it is refused when the
//! DLQ no longer holds the same messages for its selection.
//!
//! Each message gets one class:
//! - `needs_force`: failed `outcome_unknown` (Genesys may have created the session; SPEC §5);
//!   moved only when the replay is forced;
//! - `held`: a fleet claim holds its key: a live claim of a pod working on another copy of
//!   it now (`held_by` names the pod; the running worker's view, through its admin endpoint),
//!   or another copy ahead of it in this plan. Either way it waits for that copy's outcome
//!   and replays it (no second call);
//! - `replay_stored`: the audit trail has this key's session started, so the worker replays
//!   that stored outcome (webhook dead letters too: they go back to the forwarder, not to
//!   Genesys);
//! - `call`: the worker will call Genesys Cloud for it, under the budget.

use super::{list, queue_name, DlqKind, Filter};
use crate::amqp::AmqpError;
use crate::audit::{AuditAccess, AuditError};
use crate::config::Settings;
use crate::event::Reason;
use crate::store::AuditQuery;
use lapin::Connection;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

/// The share of `rate_limit.requests_per_minute` a replay is paced at, so live traffic keeps
/// the rest of the budget.
pub const REPLAY_SHARE: f64 = 0.5;
/// How far before the oldest dead letter of a plan the audit trail is read for stored outcomes.
const STORED_LOOKBACK_US: u64 = 24 * 3600 * 1_000_000;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("no plan {0:?} (plans are kept in {1}; make one with `dlq plan` or the console)")]
    Unknown(String, String),
    #[error("cannot keep the plan in {0}: {1}")]
    Save(String, String),
    #[error("the plan file {0} cannot be read: {1}")]
    Load(String, String),
    #[error("the dead-letter queue changed since plan {0} was made ({1}): make a new plan")]
    Changed(String, String),
    #[error("{0:?} is not a plan id")]
    BadId(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    Call,
    ReplayStored,
    Held,
    NeedsForce,
}

/// Which dead letters a plan takes: one queue, and a group or the `dlq` filters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    /// `worker` or `webhook`.
    pub queue: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<usize>,
}

impl Selection {
    pub fn kind(&self) -> DlqKind {
        if self.queue == "webhook" {
            DlqKind::Webhook
        } else {
            DlqKind::Worker
        }
    }

    pub fn filter(&self) -> Filter {
        Filter {
            reason: self.reason.clone(),
            id: self.id.clone(),
            since_us: self.since_us,
            max: self.max,
            group: self.group.clone().map(|g| (self.kind(), g)),
            ids: None,
        }
    }
}

/// One message of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Planned {
    pub message_id: String,
    pub idempotency_key: Option<String>,
    pub reason: Option<String>,
    pub failed_at: Option<String>,
    pub class: Class,
    /// The pod whose live claim holds the key, when that is why it is `held`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_by: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub id: String,
    pub created_at: String,
    pub selection: Selection,
    /// The queue's name.
    pub queue_name: String,
    /// Messages in the queue when the plan was made.
    pub depth: u32,
    /// The selected messages' ids, hashed: what "the DLQ changed" is checked against.
    pub fingerprint: String,
    pub counts: BTreeMap<Class, usize>,
    /// The pace of a replay: this share of the budget (messages per second).
    pub rate_per_sec: f64,
    /// How long the replay takes at that pace (the `needs_force` ones left out).
    pub estimated_secs: f64,
    /// In queue order.
    pub messages: Vec<Planned>,
}

impl Plan {
    /// The ids a replay of this plan moves: every message, `needs_force` ones only if forced.
    pub fn ids(&self, force: bool) -> Vec<String> {
        self.messages
            .iter()
            .filter(|m| force || m.class != Class::NeedsForce)
            .map(|m| m.message_id.clone())
            .collect()
    }
}

/// The pace of a replay under this deployment's budget.
pub fn replay_rate(settings: &Settings) -> f64 {
    (f64::from(settings.rate_limit.requests_per_minute) * REPLAY_SHARE / 60.0).max(0.1)
}

fn fingerprint(ids: impl Iterator<Item = String>) -> String {
    let mut all = String::new();
    for id in ids {
        all.push_str(&id);
        all.push('\n');
    }
    crate::text::sha256_hex(all.as_bytes())[..16].to_string()
}

/// Read the queue and classify what `selection` takes. `audit` (the store, or the running
/// worker's admin endpoint) says which keys have a stored session; without it none has.
pub async fn make(
    conn: &Connection,
    settings: &Settings,
    selection: Selection,
    audit: Option<&AuditAccess>,
) -> Result<Plan, PlanError> {
    let kind = selection.kind();
    let queue = queue_name(settings, kind).to_string();
    let (depth, found) = list(conn, &queue, &selection.filter()).await?;
    let oldest_us = found
        .iter()
        .filter_map(|m| m.failed_at.as_deref())
        .filter_map(|t| humantime::parse_rfc3339_weak(t).ok())
        .map(crate::audit::micros)
        .min();
    let (stored, claimed) = match (audit, oldest_us, kind) {
        (Some(a), Some(oldest), DlqKind::Worker) => {
            let keys: Vec<String> = found
                .iter()
                .filter_map(|m| m.idempotency_key.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            (
                started_keys(a, oldest.saturating_sub(STORED_LOOKBACK_US)).await?,
                a.live_claims(&keys).await?,
            )
        }
        _ => Default::default(),
    };
    let mut seen = BTreeSet::new();
    let messages: Vec<Planned> = found
        .into_iter()
        .map(|m| {
            let key = m.idempotency_key.clone();
            let k = key.as_deref();
            let ahead = Ahead {
                in_plan: &seen,
                claimed: &claimed,
            };
            let class = classify(kind, m.reason.as_deref(), k, &ahead, &stored);
            let held_by = k
                .filter(|_| class == Class::Held)
                .and_then(|k| claimed.get(k).cloned());
            if let Some(k) = &key {
                seen.insert(k.clone());
            }
            Planned {
                message_id: m.message_id,
                idempotency_key: key,
                reason: m.reason,
                failed_at: m.failed_at,
                class,
                held_by,
            }
        })
        .collect();
    let mut counts = BTreeMap::new();
    for m in &messages {
        *counts.entry(m.class).or_insert(0) += 1;
    }
    let rate = replay_rate(settings);
    let moving = messages.len() - counts.get(&Class::NeedsForce).copied().unwrap_or(0);
    Ok(Plan {
        id: format!("p-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
        created_at: crate::event::now_rfc3339(),
        fingerprint: fingerprint(messages.iter().map(|m| m.message_id.clone())),
        selection,
        queue_name: queue,
        depth,
        counts,
        rate_per_sec: rate,
        estimated_secs: moving as f64 / rate,
        messages,
    })
}

/// What holds a key ahead of a message: a copy earlier in the plan, or a live fleet claim
/// (key → the pod holding it).
struct Ahead<'a> {
    in_plan: &'a BTreeSet<String>,
    claimed: &'a BTreeMap<String, String>,
}

impl Ahead<'_> {
    fn holds(&self, key: &str) -> bool {
        self.in_plan.contains(key) || self.claimed.contains_key(key)
    }
}

fn classify(
    kind: DlqKind,
    reason: Option<&str>,
    key: Option<&str>,
    ahead: &Ahead<'_>,
    stored: &BTreeSet<String>,
) -> Class {
    if kind == DlqKind::Webhook {
        return Class::ReplayStored;
    }
    if reason == Some(Reason::OutcomeUnknown.as_str()) {
        return Class::NeedsForce;
    }
    match key {
        Some(k) if ahead.holds(k) => Class::Held,
        Some(k) if stored.contains(k) => Class::ReplayStored,
        _ => Class::Call,
    }
}

/// Keys whose session the audit trail shows started since `since_us`.
async fn started_keys(audit: &AuditAccess, since_us: u64) -> Result<BTreeSet<String>, AuditError> {
    let entries = audit
        .query(&AuditQuery {
            since_us: Some(since_us),
            ..Default::default()
        })
        .await?;
    Ok(entries
        .into_iter()
        .filter(|e| e.event_type == "session_init" && e.outcome == "started")
        .filter_map(|e| e.idempotency_key)
        .collect())
}

/// Fail with [`PlanError::Changed`] unless the queue still holds the plan's messages for its
/// selection, in the same order.
pub async fn check_unchanged(
    conn: &Connection,
    settings: &Settings,
    plan: &Plan,
) -> Result<(), PlanError> {
    let kind = plan.selection.kind();
    let (_, now) = list(conn, queue_name(settings, kind), &plan.selection.filter()).await?;
    if fingerprint(now.iter().map(|m| m.message_id.clone())) == plan.fingerprint {
        return Ok(());
    }
    let was: BTreeSet<&str> = plan
        .messages
        .iter()
        .map(|m| m.message_id.as_str())
        .collect();
    let is: BTreeSet<&str> = now.iter().map(|m| m.message_id.as_str()).collect();
    let (gone, new) = (was.difference(&is).count(), is.difference(&was).count());
    Err(PlanError::Changed(
        plan.id.clone(),
        format!(
            "{} of its messages, {gone} gone, {new} new",
            plan.messages.len()
        ),
    ))
}

/// Where plans are kept: a directory beside the store.
pub fn plans_dir(settings: &Settings) -> PathBuf {
    let mut dir = settings.store.path.clone().into_os_string();
    dir.push(".plans");
    PathBuf::from(dir)
}

fn plan_file(settings: &Settings, id: &str) -> Result<PathBuf, PlanError> {
    let ok = id.len() <= 40
        && id.starts_with("p-")
        && id[2..].chars().all(|c| c.is_ascii_alphanumeric());
    if !ok {
        return Err(PlanError::BadId(id.to_string()));
    }
    Ok(plans_dir(settings).join(format!("{id}.json")))
}

pub fn save(settings: &Settings, plan: &Plan) -> Result<(), PlanError> {
    let dir = plans_dir(settings);
    let err = |e: String| PlanError::Save(dir.display().to_string(), e);
    std::fs::create_dir_all(&dir).map_err(|e| err(e.to_string()))?;
    let bytes = serde_json::to_vec(plan).map_err(|e| err(e.to_string()))?;
    let path = plan_file(settings, &plan.id)?;
    std::fs::write(&path, bytes).map_err(|e| err(e.to_string()))
}

pub fn load(settings: &Settings, id: &str) -> Result<Arc<Plan>, PlanError> {
    let path = plan_file(settings, id)?;
    let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            PlanError::Unknown(id.to_string(), plans_dir(settings).display().to_string())
        }
        _ => PlanError::Load(path.display().to_string(), e.to_string()),
    })?;
    serde_json::from_slice(&bytes)
        .map(Arc::new)
        .map_err(|e| PlanError::Load(path.display().to_string(), e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_message_gets_the_class_the_worker_will_give_it() {
        let stored: BTreeSet<String> = ["done".to_string()].into();
        let claimed: BTreeMap<String, String> = [("busy".to_string(), "pod-b".to_string())].into();
        let mut in_plan = BTreeSet::new();
        let c = |reason, key, in_plan: &BTreeSet<String>| {
            let ahead = Ahead {
                in_plan,
                claimed: &claimed,
            };
            classify(DlqKind::Worker, reason, key, &ahead, &stored)
        };
        assert_eq!(
            c(Some("permanent_api_error"), Some("busy"), &in_plan),
            Class::Held,
            "a live claim of another pod holds it"
        );
        assert_eq!(
            c(Some("outcome_unknown"), Some("busy"), &in_plan),
            Class::NeedsForce
        );
        assert_eq!(
            c(Some("outcome_unknown"), Some("k"), &in_plan),
            Class::NeedsForce
        );
        assert_eq!(
            c(Some("permanent_api_error"), Some("k"), &in_plan),
            Class::Call
        );
        assert_eq!(
            c(Some("permanent_api_error"), Some("done"), &in_plan),
            Class::ReplayStored
        );
        assert_eq!(c(Some("invalid_request"), None, &in_plan), Class::Call);
        in_plan.insert("k".to_string());
        assert_eq!(
            c(Some("permanent_api_error"), Some("k"), &in_plan),
            Class::Held
        );
        let ahead = Ahead {
            in_plan: &in_plan,
            claimed: &claimed,
        };
        assert_eq!(
            classify(
                DlqKind::Webhook,
                Some("webhook_rejected"),
                None,
                &ahead,
                &stored
            ),
            Class::ReplayStored
        );
    }

    #[test]
    fn plan_ids_name_a_file_in_the_plans_directory_and_nothing_else() {
        let mut settings = Settings::load(None).unwrap();
        settings.store.path = PathBuf::from("/tmp/x/store");
        assert_eq!(
            plan_file(&settings, "p-0123abcd").unwrap(),
            PathBuf::from("/tmp/x/store.plans/p-0123abcd.json")
        );
        for bad in ["../etc", "p-../../x", "p-a/b", "x-1", ""] {
            assert!(plan_file(&settings, bad).is_err(), "{bad}");
        }
    }
}
