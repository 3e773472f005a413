//! What the console shows of the dead-letter queues: a snapshot of each DLQ (read without
//! consuming anything, as `dlq list` reads it), its messages grouped by failure reason and a
//! normalised detail, and pages of a group behind an opaque cursor.
//!
//! A snapshot is taken when asked for and reused for [`FRESH_FOR`]; a cursor names the snapshot
//! it pages through, so a page never mixes two readings of the queue (a cursor of an older
//! snapshot is refused with a clear error, and the page starts again).

use crate::amqp::AmqpError;
use crate::config::Settings;
pub use crate::dlq::group::{group_of, queue_label, Group};
use crate::dlq::{self, DlqKind, DlqMessage, Pass};
use lapin::Connection;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// How long a snapshot of a DLQ is reused before the queue is read again.
pub const FRESH_FOR: Duration = Duration::from_secs(5);
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
}

/// The DLQs as the console sees them.
pub struct DlqView {
    settings: Arc<Settings>,
    broker: Mutex<Option<Connection>>,
    snapshots: Mutex<BTreeMap<&'static str, Arc<Snapshot>>>,
    generation: AtomicU64,
}

impl DlqView {
    pub fn new(settings: Arc<Settings>) -> Self {
        Self {
            settings,
            broker: Mutex::new(None),
            snapshots: Mutex::new(BTreeMap::new()),
            generation: AtomicU64::new(0),
        }
    }

    /// Forget the snapshots (after a replay or a purge changed the queues).
    pub async fn forget(&self) {
        self.snapshots.lock().await.clear();
    }

    /// Both DLQs, read again if their snapshot is older than [`FRESH_FOR`].
    pub async fn snapshots(&self) -> Result<Vec<Arc<Snapshot>>, ViewError> {
        let mut out = Vec::new();
        for kind in [DlqKind::Worker, DlqKind::Webhook] {
            out.push(self.snapshot(kind).await?);
        }
        Ok(out)
    }

    async fn snapshot(&self, kind: DlqKind) -> Result<Arc<Snapshot>, ViewError> {
        let label = queue_label(kind);
        let mut snapshots = self.snapshots.lock().await;
        if let Some(s) = snapshots
            .get(label)
            .filter(|s| s.taken.elapsed() < FRESH_FOR)
        {
            return Ok(s.clone());
        }
        let fresh = Arc::new(self.read(kind).await?);
        snapshots.insert(label, fresh.clone());
        Ok(fresh)
    }

    /// Read every message of one DLQ without consuming it (the pass puts them all back, in
    /// order).
    async fn read(&self, kind: DlqKind) -> Result<Snapshot, ViewError> {
        let queue = dlq::queue_name(&self.settings, kind).to_string();
        let mut broker = self.broker.lock().await;
        if broker.as_ref().is_none_or(|c| !c.status().connected()) {
            *broker =
                Some(crate::amqp::connect(&self.settings.amqp, "session-worker console").await?);
        }
        let Some(conn) = broker.as_ref() else {
            return Err(AmqpError::op("connect", "no connection").into());
        };
        let mut pass = Pass::open(conn, &queue).await?;
        let mut messages = Vec::with_capacity(pass.depth as usize);
        while let Some(m) = pass.next().await? {
            let message = DlqMessage::from_parts(&m.delivery.properties, &m.delivery.data);
            let group = group_of(kind, &message).id;
            messages.push(Listed { message, group });
        }
        pass.finish().await?;
        Ok(Snapshot {
            kind,
            queue,
            generation: self.generation.fetch_add(1, Ordering::Relaxed) + 1,
            taken: Instant::now(),
            messages,
        })
    }

    /// Every group of both DLQs, the largest first.
    pub async fn groups(&self) -> Result<Vec<Group>, ViewError> {
        let mut groups = Vec::new();
        for s in self.snapshots().await? {
            groups.extend(groups_of(&s));
        }
        groups.sort_by(|a, b| b.count.cmp(&a.count).then(a.id.cmp(&b.id)));
        Ok(groups)
    }

    /// One page of a group, from `cursor` (or the start).
    pub async fn page(
        &self,
        group: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page, ViewError> {
        let snapshots = self.snapshots().await?;
        let Some((snapshot, found)) = snapshots.iter().find_map(|s| {
            groups_of(s)
                .into_iter()
                .find(|g| g.id == group)
                .map(|g| (s, g))
        }) else {
            return Err(ViewError::NoGroup(group.to_string()));
        };
        let from = match cursor {
            None => 0,
            Some(c) => parse_cursor(c, snapshot.generation)?,
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

fn parse_cursor(cursor: &str, generation: u64) -> Result<usize, ViewError> {
    let bad = || ViewError::BadCursor(cursor.to_string());
    let (g, p) = cursor.split_once('.').ok_or_else(bad)?;
    let g: u64 = g.parse().map_err(|_| bad())?;
    let p: usize = p.parse().map_err(|_| bad())?;
    if g != generation {
        return Err(ViewError::StaleCursor);
    }
    Ok(p)
}

/// The groups of one snapshot, in order of first appearance.
pub fn groups_of(s: &Snapshot) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    for listed in &s.messages {
        let at = match index.get(&listed.group) {
            Some(at) => *at,
            None => {
                let mut g = group_of(s.kind, &listed.message);
                g.count = 0;
                index.insert(g.id.clone(), groups.len());
                groups.push(g);
                groups.len() - 1
            }
        };
        let g = &mut groups[at];
        g.count += 1;
        let failed = listed.message.failed_at.clone();
        if failed.is_some() && (g.oldest.is_none() || failed < g.oldest) {
            g.oldest = failed.clone();
        }
        if failed > g.newest {
            g.newest = failed;
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
        let s = Snapshot {
            kind: DlqKind::Worker,
            queue: "q".into(),
            generation: 3,
            taken: Instant::now(),
            messages,
        };
        let groups = groups_of(&s);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].count, 4);
        assert_eq!(groups[0].oldest.as_deref(), Some("2026-12-04T10:00:00Z"));
        assert_eq!(groups[0].newest.as_deref(), Some("2026-12-04T10:00:06Z"));
        assert_eq!(parse_cursor("3.4", 3).ok(), Some(4));
        assert!(matches!(
            parse_cursor("2.4", 3),
            Err(ViewError::StaleCursor)
        ));
        assert!(matches!(parse_cursor("x", 3), Err(ViewError::BadCursor(_))));
    }
}
