//! Reading the audit trail: `session-worker audit tail|show|export|stats` (SPEC §6).
//!
//! sled allows one process per store. The commands open the store themselves when it is free;
//! when a running worker holds it, they ask that worker's HTTP endpoint (`GET /audit` on
//! `http.listen`) instead. The same two paths append the audit entries of the `dlq` commands.

use crate::config::Settings;
use crate::store::{AuditEntry, AuditQuery, Store, StoreError};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the store is held by a running worker, and its HTTP endpoint http://{addr} did not answer: {message}")]
    Remote { addr: String, message: String },
    #[error(
        "{0:?} is neither an RFC 3339 time (2026-11-24T10:00:00Z) nor a duration ago (90m, 24h)"
    )]
    BadTime(String),
}

/// Where audit entries are read from and written to.
pub enum AuditAccess {
    Local(Store),
    Remote { base: String, http: reqwest::Client },
}

impl AuditAccess {
    /// Open the store, or fall back to the running worker's endpoint if it holds the store.
    pub fn open(settings: &Settings) -> Result<Self, AuditError> {
        match Store::open(&settings.store.path, settings.store.idempotency_ttl) {
            Ok(store) => Ok(AuditAccess::Local(store)),
            Err(StoreError::Locked { .. }) => {
                let addr = settings
                    .http
                    .listen
                    .replace("0.0.0.0", "127.0.0.1")
                    .replace("[::]", "[::1]");
                Ok(AuditAccess::Remote {
                    base: format!("http://{addr}"),
                    http: reqwest::Client::builder()
                        .timeout(Duration::from_secs(30))
                        .build()
                        .map_err(|e| AuditError::Remote {
                            addr: addr.clone(),
                            message: e.to_string(),
                        })?,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn query(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, AuditError> {
        match self {
            AuditAccess::Local(store) => Ok(store.audit_query(q)?),
            AuditAccess::Remote { base, http } => {
                let mut params: Vec<(&str, String)> = Vec::new();
                if let Some(v) = q.since_us {
                    params.push(("since_us", v.to_string()));
                }
                if let Some(v) = q.until_us {
                    params.push(("until_us", v.to_string()));
                }
                if let Some(v) = &q.key {
                    params.push(("key", v.clone()));
                }
                if let Some(v) = q.tail {
                    params.push(("tail", v.to_string()));
                }
                let remote = |message: String| AuditError::Remote {
                    addr: base.trim_start_matches("http://").to_string(),
                    message,
                };
                let url = reqwest::Url::parse_with_params(&format!("{base}/audit"), &params)
                    .map_err(|e| remote(e.to_string()))?;
                let resp = http
                    .get(url)
                    .send()
                    .await
                    .map_err(|e| remote(e.to_string()))?;
                if !resp.status().is_success() {
                    return Err(remote(format!("HTTP {}", resp.status())));
                }
                let bytes = resp.bytes().await.map_err(|e| remote(e.to_string()))?;
                serde_json::from_slice(&bytes).map_err(|e| remote(e.to_string()))
            }
        }
    }

    pub async fn append(&self, entry: &AuditEntry) -> Result<(), AuditError> {
        match self {
            AuditAccess::Local(store) => {
                store.append_audit(entry)?;
                store.flush_now()?;
                Ok(())
            }
            AuditAccess::Remote { base, http } => {
                let remote = |message: String| AuditError::Remote {
                    addr: base.trim_start_matches("http://").to_string(),
                    message,
                };
                let body = serde_json::to_vec(entry).map_err(|e| remote(e.to_string()))?;
                let resp = http
                    .post(format!("{base}/audit"))
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| remote(e.to_string()))?;
                if resp.status().is_success() {
                    Ok(())
                } else {
                    Err(remote(format!("HTTP {}", resp.status())))
                }
            }
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

    fn entry(kind: &str, outcome: &str, latency: Option<f64>) -> AuditEntry {
        AuditEntry {
            event_type: kind.into(),
            outcome: outcome.into(),
            latency_ms: latency,
            ..Default::default()
        }
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
