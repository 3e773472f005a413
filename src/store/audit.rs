//! The append-only audit trail (SPEC §6): entries keyed by time, read by range, key or tail.

use super::{Store, StoreError};
use serde::{Deserialize, Serialize};
use std::time::{SystemTime, UNIX_EPOCH};

/// The top bit of the sequence half of an audit key: set for entries learned from the fleet
/// ledger (their sequence is their ledger position), clear for this pod's own (the store's
/// ids, which never reach it).
const FOREIGN: u64 = 1 << 63;

/// One audit entry (SPEC §6).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub timestamp: String,
    pub event_type: String,
    pub idempotency_key: Option<String>,
    pub visitor_id: Option<String>,
    pub queue_id: Option<String>,
    pub bot_score: Option<f64>,
    pub outcome: String,
    pub http_status: Option<u16>,
    pub conversation_id: Option<String>,
    pub correlation_id: Option<String>,
    pub latency_ms: Option<f64>,
    pub attempts: Option<u32>,
    pub worker_id: String,
    /// Failure detail, where there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Operator tools: how many messages an operation touched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Operator tools: who ran the operation (`$USER`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
}

/// Which audit entries to read: `[since_us, until_us)` (microseconds since the epoch),
/// optionally for one idempotency key, optionally only the last `tail`.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct AuditQuery {
    pub since_us: Option<u64>,
    pub until_us: Option<u64>,
    pub key: Option<String>,
    pub tail: Option<usize>,
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Where another pod's entry made at `at_ms` is filed: that millisecond, or now for a time
/// more than a day ahead (not a clock's skew but a broken record, which would never be
/// pruned).
fn foreign_micros(at_ms: u64) -> u64 {
    let now = super::now_ms();
    let at_ms = if at_ms > now.saturating_add(86_400_000) {
        now
    } else {
        at_ms
    };
    at_ms.saturating_mul(1000)
}

fn audit_json(entry: &AuditEntry) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(entry).map_err(|e| StoreError::Io(e.to_string()))
}

impl Store {
    /// Append an audit entry; its key orders entries by time.
    pub fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        self.insert_audit(&audit_json(entry)?, now_micros(), None)
    }

    /// [`Store::append_audit`] of an entry already made into JSON (an outcome's, made once
    /// for the store and the fleet ledger).
    pub fn append_audit_json(&self, json: &str) -> Result<(), StoreError> {
        self.insert_audit(json.as_bytes(), now_micros(), None)
    }

    /// Store the audit entry of another pod's outcome, read from the fleet ledger at `offset`
    /// (the `index`th record of that message), under its outcome's time `at_ms`. The key
    /// comes from the ledger position, so a record applied again after a restart (the reader
    /// saves its offset every few seconds, not per record) replaces its entry instead of
    /// adding a second one.
    ///
    /// `json` is the entry as the ledger carried it, already checked to parse as an
    /// [`AuditEntry`]: it is stored as it came.
    pub fn put_foreign_audit(
        &self,
        json: &str,
        at_ms: u64,
        offset: u64,
        index: usize,
    ) -> Result<(), StoreError> {
        let seq = FOREIGN | (offset << 16) | (index as u64 & 0xffff);
        self.insert_audit(json.as_bytes(), foreign_micros(at_ms), Some(seq))
    }

    /// Whether the audit entry of another pod's outcome for `key` made at `at_ms` is stored,
    /// from whichever ledger position: the reader asks before it takes an outcome read again
    /// for one told before (then the entry is here) or for one whose entry's insert failed
    /// (then it is not, and is stored now). Reads only the entries filed under that
    /// millisecond.
    pub fn has_foreign_audit(&self, key: &str, at_ms: u64) -> Result<bool, StoreError> {
        #[derive(Deserialize)]
        struct Key<'a> {
            #[serde(borrow)]
            idempotency_key: Option<std::borrow::Cow<'a, str>>,
        }
        let t = self.trees()?;
        for item in t.audit.scan_prefix(foreign_micros(at_ms).to_be_bytes()) {
            let (k, v) = item?;
            let foreign = k
                .get(8..16)
                .and_then(|seq| <[u8; 8]>::try_from(seq).ok())
                .is_some_and(|seq| u64::from_be_bytes(seq) & FOREIGN != 0);
            if foreign
                && serde_json::from_slice::<Key>(&v)
                    .is_ok_and(|e| e.idempotency_key.as_deref() == Some(key))
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The one place an audit entry is written: key = time (µs, big-endian) + a sequence
    /// number (`seq`, or the next id of the store). Given as a slice: sled copies a value
    /// into its own buffer either way.
    fn insert_audit(&self, bytes: &[u8], micros: u64, seq: Option<u64>) -> Result<(), StoreError> {
        self.write(|t| {
            let seq = match seq {
                Some(s) => s,
                None => t.db.generate_id()?,
            };
            let mut key = [0u8; 16];
            key[..8].copy_from_slice(&micros.to_be_bytes());
            key[8..].copy_from_slice(&seq.to_be_bytes());
            t.audit.insert(key, bytes)?;
            Ok(())
        })
    }

    /// Audit entries with timestamps in `[since, until)` (microseconds since the epoch), oldest first.
    pub fn audit_range(
        &self,
        since_us: u64,
        until_us: u64,
    ) -> impl Iterator<Item = Result<AuditEntry, StoreError>> {
        let start = since_us.to_be_bytes();
        let end = until_us.to_be_bytes();
        let (range, opened) = match self.trees() {
            Ok(t) => (Some(t.audit.range(start..end)), None),
            Err(e) => (None, Some(Err(e))),
        };
        opened
            .into_iter()
            .chain(range.into_iter().flatten().map(|item| {
                let (k, v) = item?;
                serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                    key: format!("audit/{}", crate::text::hex(&k)),
                    message: e.to_string(),
                })
            }))
    }

    /// Every audit entry, oldest first.
    pub fn audit_all(&self) -> impl Iterator<Item = Result<AuditEntry, StoreError>> {
        self.audit_range(0, u64::MAX)
    }

    /// The entries `q` selects, oldest first.
    pub fn audit_query(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        let mut out = Vec::new();
        for entry in self.audit_range(q.since_us.unwrap_or(0), q.until_us.unwrap_or(u64::MAX)) {
            let entry = entry?;
            if q.key
                .as_deref()
                .is_some_and(|k| entry.idempotency_key.as_deref() != Some(k))
            {
                continue;
            }
            out.push(entry);
        }
        if let Some(n) = q.tail {
            let skip = out.len().saturating_sub(n);
            out.drain(..skip);
        }
        Ok(out)
    }

    pub fn audit_len(&self) -> usize {
        self.trees().map_or(0, |t| t.audit.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_foreign_entry_applied_twice_is_stored_once_in_time_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), Duration::from_secs(3600)).unwrap();
        let entry = |k: &str| AuditEntry {
            idempotency_key: Some(k.into()),
            outcome: "started".into(),
            ..Default::default()
        };
        let json = |k: &str| serde_json::to_string(&entry(k)).unwrap();
        s.append_audit(&entry("local")).unwrap();
        let then = super::super::now_ms() - 60_000;
        s.put_foreign_audit(&json("a"), then, 41, 0).unwrap();
        s.put_foreign_audit(&json("b"), then, 41, 1).unwrap();
        // The same ledger records again (a restart before the offset was saved).
        s.put_foreign_audit(&json("a"), then, 41, 0).unwrap();
        s.put_foreign_audit(&json("b"), then, 41, 1).unwrap();
        // A time far ahead (a broken record) is filed under now, so retention prunes it.
        s.put_foreign_audit(&json("future"), u64::MAX, 42, 0)
            .unwrap();
        let keys: Vec<_> = s
            .audit_all()
            .map(|e| e.unwrap().idempotency_key.unwrap())
            .collect();
        // "future" is filed under the current millisecond, "local" under its microsecond.
        let (older, recent) = keys.split_at(2);
        assert_eq!(older, ["a", "b"]);
        let mut recent = recent.to_vec();
        recent.sort();
        assert_eq!(recent, ["future", "local"]);
        let within_a_second = (super::super::now_ms() + 1_000) * 1_000;
        assert_eq!(
            s.audit_range(0, within_a_second).count(),
            4,
            "nothing filed in the future, where retention would never reach it"
        );
    }

    #[test]
    fn a_foreign_entry_is_found_by_key_and_time_from_any_ledger_position() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), Duration::from_secs(3600)).unwrap();
        let json = |k: &str| {
            serde_json::to_string(&AuditEntry {
                idempotency_key: Some(k.into()),
                outcome: "started".into(),
                ..Default::default()
            })
            .unwrap()
        };
        let then = super::super::now_ms() - 60_000;
        assert!(!s.has_foreign_audit("a", then).unwrap());
        s.put_foreign_audit(&json("a"), then, 7, 3).unwrap();
        s.put_foreign_audit(&json("b"), then, 7, 4).unwrap();
        assert!(s.has_foreign_audit("a", then).unwrap());
        assert!(s.has_foreign_audit("b", then).unwrap());
        assert!(!s.has_foreign_audit("c", then).unwrap(), "another key");
        assert!(!s.has_foreign_audit("a", then + 1).unwrap(), "another time");
        // This pod's own entry for a key is not another pod's.
        s.insert_audit(json("own").as_bytes(), then * 1000, None)
            .unwrap();
        assert!(!s.has_foreign_audit("own", then).unwrap());
    }
}
