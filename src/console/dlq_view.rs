//! What the console shows of the dead-letter queues: a snapshot of each DLQ (read without
//! consuming anything, as `dlq list` reads it), its messages grouped by failure reason and a
//! normalised detail, and pages of a group behind an opaque cursor.
//!
//! A snapshot is taken when asked for and served as it is for [`FRESH_FOR`]; after that, up to
//! [`STALE_FOR`], it is still served (with its age) while a fresh one is read in the background,
//! so an operator never waits for a large queue to be read twice. A cursor names the snapshot it
//! pages through, so a page never mixes two readings of the queue; the current snapshot and the
//! one before are kept (a cursor of an older one is refused with a clear error, and the page
//! starts again).

use crate::amqp::AmqpError;
use crate::config::Settings;
pub use crate::dlq::group::{group_of, queue_label, Group};
use crate::dlq::{self, DlqKind, DlqMessage};
use lapin::Connection;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// How long a snapshot of a DLQ is served as it is.
pub const FRESH_FOR: Duration = Duration::from_secs(5);
/// How long an older snapshot is still served while a fresh one is read in the background;
/// after that a request waits for the fresh one.
pub const STALE_FOR: Duration = Duration::from_secs(300);
/// The most messages one page holds.
pub const MAX_PAGE: usize = 500;

/// One DLQ as read at one moment.
pub struct Snapshot {
    pub kind: DlqKind,
    pub queue: String,
    pub generation: u64,
    pub taken: Instant,
    /// In queue order.
    pub messages: Vec<Listed>,
    /// Its groups, in order of first appearance.
    pub groups: Vec<Group>,
}

/// A dead letter and the group it falls in.
#[derive(Clone, Serialize)]
pub struct Listed {
    #[serde(flatten)]
    pub message: DlqMessage,
    pub group: String,
}

/// A page of one group's messages.
#[derive(Serialize)]
pub struct Page {
    pub group: Group,
    pub messages: Vec<Listed>,
    /// Present while more messages follow.
    pub next_cursor: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    #[error("no group {0:?} in the dead-letter queues now (it may have been replayed or purged)")]
    NoGroup(String),
    #[error("the cursor belongs to an earlier reading of the queue: start the group again")]
    StaleCursor,
    #[error("{0:?} is not a cursor this console gave out")]
    BadCursor(String),
    #[error("a replay of this console is running: {0} would read the queue and hold the messages it replays; try again when it is over")]
    Replaying(String),
}

/// The DLQs as the console sees them.
#[derive(Clone)]
pub struct DlqView {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Arc<Settings>,
    /// One reading of the queues at a time, on the console's own connection.
    broker: Mutex<Option<Connection>>,
    slots: std::sync::Mutex<BTreeMap<&'static str, Slot>>,
    generation: AtomicU64,
    /// Replays this console runs now: while one runs, the last readings are served as they
    /// are, since a reading holds every message it has not yet returned and the replay's
    /// `basic.get` would take the queue for empty and end early.
    replays: AtomicUsize,
}

/// Held while one of this console's replays runs (see [`DlqView::replaying`]).
pub struct Replaying(Arc<Inner>);

impl Drop for Replaying {
    fn drop(&mut self) {
        self.0.replays.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What is known of one DLQ.
#[derive(Default)]
struct Slot {
    current: Option<Arc<Snapshot>>,
    /// The snapshot before it, kept so that a cursor handed out from it still pages.
    previous: Option<Arc<Snapshot>>,
    refreshing: bool,
}

impl DlqView {
    pub fn new(settings: Arc<Settings>) -> Self {
        Self {
            inner: Arc::new(Inner {
                settings,
                broker: Mutex::new(None),
                slots: std::sync::Mutex::new(BTreeMap::new()),
                generation: AtomicU64::new(0),
                replays: AtomicUsize::new(0),
            }),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Slot>> {
        self.inner
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Hold off the console's own readings while a write action (a plan, a replay's check, a
    /// purge) reads a DLQ: two passes at once each see the messages the other holds as gone.
    pub async fn turn(&self) -> tokio::sync::MutexGuard<'_, Option<Connection>> {
        self.inner.broker.lock().await
    }

    /// A replay of this console starts: no reading of the queues until the guard is dropped
    /// (the last readings are served, however old), unless there is none yet.
    pub fn replaying(&self) -> Replaying {
        self.inner.replays.fetch_add(1, Ordering::Relaxed);
        Replaying(self.inner.clone())
    }

    /// Whether one of this console's replays runs now.
    pub fn is_replaying(&self) -> bool {
        self.inner.replays.load(Ordering::Relaxed) > 0
    }

    /// Take the turn for a reading of a write action or a message view (see [`Self::turn`]),
    /// refused while one of this console's replays runs: the reading would hold the messages
    /// the replay takes. Checked in turn, since a replay counts itself before giving it up.
    pub async fn reading_turn(
        &self,
        what: &str,
    ) -> Result<tokio::sync::MutexGuard<'_, Option<Connection>>, ViewError> {
        let turn = self.turn().await;
        if self.is_replaying() {
            return Err(ViewError::Replaying(what.to_string()));
        }
        Ok(turn)
    }

    /// Forget the snapshots (after a replay or a purge changed the queues).
    pub async fn forget(&self) {
        self.slots().clear();
    }

    /// Both DLQs: the latest snapshot if it is fresh; if it is merely stale, that one while a
    /// fresh one is read in the background; otherwise a fresh one.
    pub async fn snapshots(&self) -> Result<Vec<Arc<Snapshot>>, ViewError> {
        let mut out = Vec::new();
        for kind in [DlqKind::Worker, DlqKind::Webhook] {
            out.push(self.snapshot(kind).await?);
        }
        Ok(out)
    }

    async fn snapshot(&self, kind: DlqKind) -> Result<Arc<Snapshot>, ViewError> {
        let label = queue_label(kind);
        {
            let mut slots = self.slots();
            let slot = slots.entry(label).or_default();
            if let Some(s) = slot.current.clone() {
                let age = s.taken.elapsed();
                if age < FRESH_FOR || self.is_replaying() {
                    return Ok(s);
                }
                if age < STALE_FOR {
                    if !slot.refreshing {
                        slot.refreshing = true;
                        let view = self.clone();
                        tokio::spawn(async move {
                            if let Err(e) = view.refresh(kind).await {
                                tracing::warn!(error = %e, "console: reading the DLQ again failed");
                            }
                            if let Some(slot) = view.slots().get_mut(label) {
                                slot.refreshing = false;
                            }
                        });
                    }
                    return Ok(s);
                }
            }
        }
        self.refresh(kind).await
    }

    /// Read one DLQ (unless a reading that finished while this one waited its turn is fresh)
    /// and make it the current snapshot.
    async fn refresh(&self, kind: DlqKind) -> Result<Arc<Snapshot>, ViewError> {
        let label = queue_label(kind);
        let mut broker = self.inner.broker.lock().await;
        let fresh = self.slots().get(label).and_then(|s| s.current.clone());
        // A replay that began while this reading waited its turn: serve what there is.
        let replaying = self.is_replaying();
        if let Some(s) = fresh.filter(|s| replaying || s.taken.elapsed() < FRESH_FOR) {
            return Ok(s);
        }
        let read = Arc::new(self.read(kind, &mut broker).await?);
        let mut slots = self.slots();
        let slot = slots.entry(label).or_default();
        slot.previous = slot.current.replace(read.clone());
        Ok(read)
    }

    /// Read every message of one DLQ without consuming it (the scan puts them all back, in
    /// order).
    async fn read(
        &self,
        kind: DlqKind,
        broker: &mut Option<Connection>,
    ) -> Result<Snapshot, ViewError> {
        let settings = &self.inner.settings;
        let queue = dlq::queue_name(settings, kind).to_string();
        if broker.as_ref().is_none_or(|c| !c.status().connected()) {
            *broker = Some(crate::amqp::connect(&settings.amqp, "session-worker console").await?);
        }
        let Some(conn) = broker.as_ref() else {
            return Err(AmqpError::op("connect", "no connection").into());
        };
        let mut messages = Vec::new();
        dlq::scan::scan(conn, &queue, |d| {
            let message = DlqMessage::from_parts(&d.properties, &d.data);
            let group = group_of(kind, &message).id;
            messages.push(Listed { message, group });
            dlq::scan::Take::Keep
        })
        .await?;
        let groups = groups_of(kind, &messages);
        Ok(Snapshot {
            kind,
            queue,
            generation: self.inner.generation.fetch_add(1, Ordering::Relaxed) + 1,
            taken: Instant::now(),
            messages,
            groups,
        })
    }

    /// The snapshot a cursor was handed out from, if it is still kept.
    fn by_generation(&self, kind: DlqKind, generation: u64) -> Option<Arc<Snapshot>> {
        let slots = self.slots();
        let slot = slots.get(queue_label(kind))?;
        for s in [&slot.current, &slot.previous].into_iter().flatten() {
            if s.generation == generation {
                return Some(s.clone());
            }
        }
        None
    }

    /// Every group of both DLQs, the largest first.
    pub async fn groups(&self) -> Result<Vec<Group>, ViewError> {
        let mut groups = Vec::new();
        for s in self.snapshots().await? {
            groups.extend(s.groups.iter().cloned());
        }
        groups.sort_by(|a, b| b.count.cmp(&a.count).then(a.id.cmp(&b.id)));
        Ok(groups)
    }

    /// One page of a group, from `cursor` (or the start). A cursor pages through the snapshot
    /// it was handed out from while that one is kept (the current or the one before).
    pub async fn page(
        &self,
        group: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page, ViewError> {
        let (snapshot, from) = match cursor {
            Some(c) => {
                let (generation, from) = parse_cursor(c)?;
                let kept = [DlqKind::Worker, DlqKind::Webhook]
                    .into_iter()
                    .find_map(|kind| self.by_generation(kind, generation));
                (kept.ok_or(ViewError::StaleCursor)?, from)
            }
            None => {
                let snapshots = self.snapshots().await?;
                let found = snapshots
                    .into_iter()
                    .find(|s| s.groups.iter().any(|g| g.id == group));
                (
                    found.ok_or_else(|| ViewError::NoGroup(group.to_string()))?,
                    0,
                )
            }
        };
        let Some(found) = snapshot.groups.iter().find(|g| g.id == group).cloned() else {
            return Err(ViewError::NoGroup(group.to_string()));
        };
        let limit = limit.clamp(1, MAX_PAGE);
        let mut messages = Vec::new();
        let mut next = None;
        for (position, listed) in snapshot.messages.iter().enumerate().skip(from) {
            if listed.group != group {
                continue;
            }
            if messages.len() == limit {
                next = Some(format!("{}.{position}", snapshot.generation));
                break;
            }
            messages.push(listed.clone());
        }
        Ok(Page {
            group: found,
            messages,
            next_cursor: next,
        })
    }

    /// The dead letters whose idempotency key or correlation id is one of `ids`.
    pub async fn find(&self, ids: &[String]) -> Result<Vec<(String, Listed)>, ViewError> {
        let mut found = Vec::new();
        for s in self.snapshots().await? {
            for listed in &s.messages {
                let m = &listed.message;
                let hit = [&m.idempotency_key, &m.correlation_id]
                    .into_iter()
                    .flatten()
                    .any(|v| ids.contains(v))
                    || ids.contains(&m.message_id);
                if hit {
                    found.push((queue_label(s.kind).to_string(), listed.clone()));
                }
            }
        }
        Ok(found)
    }
}

/// A cursor's snapshot generation and position.
fn parse_cursor(cursor: &str) -> Result<(u64, usize), ViewError> {
    let bad = || ViewError::BadCursor(cursor.to_string());
    let (g, p) = cursor.split_once('.').ok_or_else(bad)?;
    let g: u64 = g.parse().map_err(|_| bad())?;
    let p: usize = p.parse().map_err(|_| bad())?;
    Ok((g, p))
}

/// The groups of one DLQ's messages, in order of first appearance.
pub fn groups_of(kind: DlqKind, messages: &[Listed]) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    for listed in messages {
        let at = match index.get(listed.group.as_str()) {
            Some(at) => *at,
            None => {
                let mut g = group_of(kind, &listed.message);
                g.count = 0;
                index.insert(&listed.group, groups.len());
                groups.push(g);
                groups.len() - 1
            }
        };
        let g = &mut groups[at];
        g.count += 1;
        let failed = &listed.message.failed_at;
        if failed.is_some() && (g.oldest.is_none() || *failed < g.oldest) {
            g.oldest.clone_from(failed);
        }
        if *failed > g.newest {
            g.newest.clone_from(failed);
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::dlq::group::test_message as message;

    #[test]
    fn groups_count_and_date_their_messages_and_pages_follow_a_cursor() {
        let messages: Vec<Listed> = (0..7)
            .map(|i| {
                let reason = if i % 2 == 0 {
                    "invalid_request"
                } else {
                    "poison_message"
                };
                let m = message(reason, "bad body", &format!("2026-12-04T10:00:0{i}Z"));
                Listed {
                    group: group_of(DlqKind::Worker, &m).id,
                    message: m,
                }
            })
            .collect();
        let groups = groups_of(DlqKind::Worker, &messages);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].count, 4);
        assert_eq!(groups[0].oldest.as_deref(), Some("2026-12-04T10:00:00Z"));
        assert_eq!(groups[0].newest.as_deref(), Some("2026-12-04T10:00:06Z"));
        assert_eq!(parse_cursor("3.4").ok(), Some((3, 4)));
        assert!(matches!(parse_cursor("x"), Err(ViewError::BadCursor(_))));
        assert!(matches!(parse_cursor("3.x"), Err(ViewError::BadCursor(_))));
    }
}
