//! Reading the audit trail: `session-worker audit tail|show|export|stats` (SPEC §6).
//!
//! sled allows one process per store. The commands open the store themselves when it is free;
//! when a running worker holds it, they ask that worker's admin endpoint (a Unix socket beside
//! the store, reachable only inside its pod; see [`crate::admin`]) instead. The same two paths
//! record the audit entries of the `dlq` commands; neither can write anything else.

use crate::admin::{AdminClient, AdminError, Operation};
use crate::config::Settings;
use crate::store::{AuditEntry, AuditQuery, Store, StoreError};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("there is no store at {0} (store.path); check --config and SESSION_WORKER__STORE__PATH: this command reads the store of the worker it runs beside")]
    NoStore(PathBuf),
    #[error(
        "{0:?} is neither an RFC 3339 time (2026-11-24T10:00:00Z) nor a duration ago (90m, 24h)"
    )]
    BadTime(String),
}

/// Where audit entries are read from, and operator actions recorded.
pub enum AuditAccess {
    Local(Store),
    Remote(AdminClient),
}

impl AuditAccess {
    /// Open the store, or reach the running worker's admin endpoint if it holds the store.
    /// A store that does not exist is an error, not an empty trail.
    pub fn open(settings: &Settings) -> Result<Self, AuditError> {
        let path = &settings.store.path;
        if !path.exists() {
            return Err(AuditError::NoStore(path.clone()));
        }
        match Store::open(path, settings.store.idempotency_ttl) {
            Ok(store) => Ok(AuditAccess::Local(store)),
            Err(StoreError::Locked { .. }) => Ok(AuditAccess::Remote(AdminClient::new(path))),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn query(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, AuditError> {
        match self {
            AuditAccess::Local(store) => Ok(store.audit_query(q)?),
            AuditAccess::Remote(client) => Ok(client.audit_query(q).await?),
        }
    }

    /// Which of `keys` a live fleet claim holds, by pod: the running worker's view (through
    /// its admin endpoint), or, with no worker on this store, the claims it saved last.
    pub async fn live_claims(
        &self,
        keys: &[String],
    ) -> Result<BTreeMap<String, String>, AuditError> {
        let holders = match self {
            AuditAccess::Local(store) => crate::fleet::claims::Claims::saved(store)
                .holders(keys.to_vec(), crate::store::now_ms()),
            AuditAccess::Remote(client) => client.live_claims(keys).await?,
        };
        Ok(holders.into_iter().collect())
    }

    /// Record an operator action (`dlq replay`, `dlq purge`) in the trail.
    pub async fn record(&self, operation: &Operation) -> Result<(), AuditError> {
        match self {
            AuditAccess::Local(store) => {
                store.append_audit(&operation.entry())?;
                store.flush_now()?;
                Ok(())
            }
            AuditAccess::Remote(client) => Ok(client.record_operation(operation).await?),
        }
    }
}

/// Microseconds since the epoch for an RFC 3339 time, or for "now minus" a duration.
pub fn parse_time(text: &str) -> Result<u64, AuditError> {
    let t = text.trim();
    if let Ok(at) = humantime::parse_rfc3339_weak(t) {
        return Ok(micros(at));
    }
    if let Ok(ago) = humantime::parse_duration(t) {
        return Ok(micros(SystemTime::now()).saturating_sub(ago.as_micros() as u64));
    }
    Err(AuditError::BadTime(text.to_string()))
}

pub fn micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// `audit tail --follow`: which time window to read on each poll, and which of the entries
/// read are new. Entries learned from the fleet ledger are stored under their outcome's time,
/// a little before this pod learned them, so each poll looks back up to [`Follow::LAG`]
/// (never before the follow began) and leaves out what it printed already.
pub struct Follow {
    began: u64,
    since: u64,
    printed: std::collections::HashSet<String>,
    /// Printed entries by the poll that printed them, oldest first (to forget them).
    printed_at: std::collections::VecDeque<(u64, String)>,
}

impl Follow {
    /// How far back each poll looks, in µs.
    pub const LAG: u64 = 10_000_000;

    pub fn new(began_us: u64) -> Self {
        Self {
            began: began_us,
            since: began_us,
            printed: Default::default(),
            printed_at: Default::default(),
        }
    }

    /// The window `[since, until)` to read at `now_us`.
    pub fn window(&self, now_us: u64) -> (u64, u64) {
        (self.since.saturating_sub(Self::LAG).max(self.began), now_us)
    }

    /// The entries of the window read at `now_us` not printed before; the next window starts
    /// from `now_us`.
    pub fn fresh(&mut self, entries: Vec<AuditEntry>, now_us: u64) -> Vec<AuditEntry> {
        let (from, _) = self.window(now_us);
        while self.printed_at.front().is_some_and(|(at, _)| *at < from) {
            if let Some((_, id)) = self.printed_at.pop_front() {
                self.printed.remove(&id);
            }
        }
        let mut fresh = Vec::new();
        for e in entries {
            let id = serde_json::to_string(&e).unwrap_or_default();
            if self.printed.insert(id.clone()) {
                self.printed_at.push_back((now_us, id));
                fresh.push(e);
            }
        }
        self.since = now_us;
        fresh
    }
}

/// Counts by event type and outcome, and latency percentiles of session creations.
#[derive(Debug, Default, PartialEq)]
pub struct Stats {
    pub total: usize,
    pub by_outcome: BTreeMap<(String, String), usize>,
    pub latency_p50: Option<f64>,
    pub latency_p95: Option<f64>,
    pub latency_p99: Option<f64>,
}

pub fn stats(entries: &[AuditEntry]) -> Stats {
    let mut s = Stats {
        total: entries.len(),
        ..Default::default()
    };
    let mut latencies: Vec<f64> = Vec::new();
    for e in entries {
        *s.by_outcome
            .entry((e.event_type.clone(), e.outcome.clone()))
            .or_default() += 1;
        if e.event_type == "session_init" && e.outcome == "started" {
            if let Some(l) = e.latency_ms {
                latencies.push(l);
            }
        }
    }
    latencies.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| -> Option<f64> {
        if latencies.is_empty() {
            return None;
        }
        let rank = ((p / 100.0) * latencies.len() as f64).ceil() as usize;
        latencies.get(rank.clamp(1, latencies.len()) - 1).copied()
    };
    s.latency_p50 = pct(50.0);
    s.latency_p95 = pct(95.0);
    s.latency_p99 = pct(99.0);
    s
}

impl Stats {
    pub fn render(&self) -> String {
        let mut out = format!(
            "{} audit entries\n\n{:<18} {:<22} {:>8}\n",
            self.total, "event_type", "outcome", "count"
        );
        for ((kind, outcome), n) in &self.by_outcome {
            out.push_str(&format!("{kind:<18} {outcome:<22} {n:>8}\n"));
        }
        let show = |v: Option<f64>| {
            v.map(|x| format!("{x:.1} ms"))
                .unwrap_or_else(|| "-".into())
        };
        out.push_str(&format!(
            "\nGenesys session latency (started): p50 {}  p95 {}  p99 {}\n",
            show(self.latency_p50),
            show(self.latency_p95),
            show(self.latency_p99)
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entry(kind: &str, outcome: &str, latency: Option<f64>) -> AuditEntry {
        AuditEntry {
            event_type: kind.into(),
            outcome: outcome.into(),
            latency_ms: latency,
            ..Default::default()
        }
    }

    #[test]
    fn follow_prints_a_late_learned_entry_once_and_nothing_from_before_it_began() {
        let entry = |k: &str| AuditEntry {
            idempotency_key: Some(k.into()),
            outcome: "started".into(),
            ..Default::default()
        };
        let began = 100_000_000;
        let mut f = Follow::new(began);
        assert_eq!(f.window(began + 1_000_000), (began, began + 1_000_000));
        assert_eq!(f.fresh(vec![entry("a")], began + 1_000_000).len(), 1);
        // Next poll: the window reaches back (not before the start); "b" was stored under
        // an earlier time, learned from the ledger after the last poll.
        let now = began + 2_000_000;
        assert_eq!(f.window(now), (began, now));
        let fresh = f.fresh(vec![entry("a"), entry("b")], now);
        assert_eq!(fresh, vec![entry("b")]);
        // Long after, the window no longer reaches them and they are forgotten.
        let later = began + 60_000_000;
        assert_eq!(f.window(later).0, began, "never before the follow began");
        assert_eq!(f.fresh(vec![entry("c")], later), vec![entry("c")]);
        let last = later + 1_000_000;
        assert_eq!(f.window(last).0, later - Follow::LAG);
        assert!(f.fresh(vec![], last).is_empty());
        assert_eq!(f.printed.len(), 1, "only c is within the window");
    }

    #[test]
    fn stats_count_and_rank_latencies() {
        let mut entries: Vec<_> = (1..=100)
            .map(|i| entry("session_init", "started", Some(i as f64)))
            .collect();
        entries.push(entry("session_init", "invalid_request", None));
        entries.push(entry("webhook_delivery", "delivered", Some(5000.0)));
        let s = stats(&entries);
        assert_eq!(s.total, 102);
        assert_eq!(
            s.by_outcome[&("session_init".into(), "started".into())],
            100
        );
        assert_eq!(
            (s.latency_p50, s.latency_p95, s.latency_p99),
            (Some(50.0), Some(95.0), Some(99.0))
        );
        assert!(s.render().contains("invalid_request"));
    }

    #[test]
    fn times_are_rfc3339_or_ago() {
        assert_eq!(parse_time("1970-01-01T00:00:01Z").unwrap(), 1_000_000);
        let ago = parse_time("1h").unwrap();
        let now = micros(SystemTime::now());
        assert!(now - ago >= 3_600_000_000 && now - ago < 3_601_000_000);
        assert!(parse_time("yesterday-ish").is_err());
    }

    #[tokio::test]
    async fn query_filters_by_time_key_and_tail() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Duration::from_secs(60)).unwrap();
        let mut marks = Vec::new();
        for i in 0..5 {
            marks.push(micros(SystemTime::now()));
            let mut e = entry("session_init", "started", Some(1.0));
            e.idempotency_key = Some(format!("k{}", i % 2));
            store.append_audit(&e).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        let between = store
            .audit_query(&AuditQuery {
                since_us: Some(marks[1]),
                until_us: Some(marks[3]),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(between.len(), 2, "exactly the entries in [since, until)");
        let k1 = store
            .audit_query(&AuditQuery {
                key: Some("k1".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(k1.len(), 2);
        let tail = store
            .audit_query(&AuditQuery {
                tail: Some(3),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(tail.len(), 3);
        assert_eq!(tail[2].idempotency_key.as_deref(), Some("k0"));
    }
}
