//! The append-only audit trail (SPEC §6): entries keyed by time, read by range, key or tail.
//!
//! Two kinds of value live in the tree. This pod's own entries are one JSON object each,
//! filed under their time. Other pods' entries, learned from the fleet ledger, are stored a
//! ledger message at a time: one value holds the entries of one message whose times lie
//! within [`BATCH_SPREAD_MS`] of each other, as `[[at_ms, entry], ...]`, filed under the
//! latest of those times. One sled insert a message instead of one an entry is what lets a
//! new pod restore the fleet's history at the broker's pace (an insert's cost is nearly all
//! per insert, not per byte). Readers see entries one by one, in time order, whichever way
//! they were stored ([`Store::audit_range`]).

use super::{Store, StoreError};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use std::cmp::{Ordering as CmpOrdering, Reverse};
use std::collections::BinaryHeap;
use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

/// The top bit of the sequence half of an audit key: set for entries learned from the fleet
/// ledger (their sequence is their ledger position), clear for this pod's own (the store's
/// ids, which never reach it).
const FOREIGN: u64 = 1 << 63;

/// How far apart in time the entries of one stored batch may lie: a batch is filed under its
/// latest time, so every entry it holds lies at most this much before its key.
pub const BATCH_SPREAD_MS: u64 = 1_000;

const BATCH_SPREAD_US: u64 = BATCH_SPREAD_MS * 1_000;

/// Entries a reader of the trail holds back to hand them out in time order: a second's worth
/// of a busy fleet's outcomes. Past it (a trail whose entries all carry one time, which only a
/// test or a broken ledger writes) the earliest are handed out at once, so a reader's memory
/// stays bounded and the order is kept but for that second's spread.
const MAX_PENDING: usize = 65_536;

/// Another pod's audit entry as the ledger carried it, to be stored with the others of its
/// ledger message ([`Store::put_foreign_audits`]).
#[derive(Debug, Clone, Copy)]
pub struct ForeignEntry<'a> {
    /// The outcome's time.
    pub at_ms: u64,
    /// The outcome record's place in its ledger message.
    pub index: usize,
    /// The entry's JSON, already checked to parse as an [`AuditEntry`].
    pub json: &'a str,
}

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
    /// The Web Messaging start's message id (what the details call resolved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    pub latency_ms: Option<f64>,
    pub attempts: Option<u32>,
    pub worker_id: String,
    /// Failure detail, where there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Operator tools: how many messages an operation touched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Operator tools: who ran the operation (`$USER`, or the name given in the console).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    /// Console: the role of the token that did it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Console and `dlq replay --plan`: the replay plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_id: Option<String>,
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
fn foreign_ms(at_ms: u64) -> u64 {
    let now = super::now_ms();
    if at_ms > now.saturating_add(86_400_000) {
        now
    } else {
        at_ms
    }
}

/// The time half of an audit key, in µs.
fn key_micros(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(..8)?.try_into().ok()?))
}

/// Whether an audit key is another pod's (its sequence has [`FOREIGN`] set).
fn is_foreign(key: &[u8]) -> bool {
    key.get(8..16)
        .and_then(|seq| <[u8; 8]>::try_from(seq).ok())
        .is_some_and(|seq| u64::from_be_bytes(seq) & FOREIGN != 0)
}

/// A stored value holds a batch of other pods' entries (a JSON array) rather than one entry.
fn is_batch(value: &[u8]) -> bool {
    value.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[')
}

fn corrupt(key: &[u8], e: serde_json::Error) -> StoreError {
    StoreError::Corrupt {
        key: format!("audit/{}", crate::text::hex(key)),
        message: e.to_string(),
    }
}

/// The entries of one stored value with their times in µs: one for an entry of its own, each
/// of a batch.
fn decode_value(key: &[u8], value: &[u8]) -> Result<Vec<(u64, AuditEntry)>, StoreError> {
    if is_batch(value) {
        let batch: Vec<(u64, AuditEntry)> =
            serde_json::from_slice(value).map_err(|e| corrupt(key, e))?;
        Ok(batch
            .into_iter()
            .map(|(at_ms, entry)| (at_ms.saturating_mul(1000), entry))
            .collect())
    } else {
        let entry = serde_json::from_slice(value).map_err(|e| corrupt(key, e))?;
        Ok(vec![(key_micros(key).unwrap_or(0), entry)])
    }
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
    /// (the `index`th record of that message), under its outcome's time `at_ms`: a batch of
    /// one ([`Store::put_foreign_audits`]). For tests: the reader stores a message's entries
    /// together.
    #[cfg(test)]
    pub fn put_foreign_audit(
        &self,
        json: &str,
        at_ms: u64,
        offset: u64,
        index: usize,
    ) -> Result<(), StoreError> {
        self.put_foreign_audits(offset, &[ForeignEntry { at_ms, index, json }])
    }

    /// Store the audit entries of other pods' outcomes read from the ledger message at
    /// `offset`, each as the ledger carried it (already checked to parse as an
    /// [`AuditEntry`]). Entries within [`BATCH_SPREAD_MS`] of each other share one value,
    /// filed under their latest time; its key comes from the ledger position (the offset and
    /// the batch's first record), so a message applied again after a restart (the reader
    /// saves its offset every few seconds, not per record) replaces its batches instead of
    /// adding second ones. A time more than a day ahead (not a clock's skew but a broken
    /// record, which would never be pruned) is taken as now.
    pub fn put_foreign_audits(
        &self,
        offset: u64,
        entries: &[ForeignEntry<'_>],
    ) -> Result<(), StoreError> {
        let mut sorted: Vec<ForeignEntry<'_>> = entries
            .iter()
            .map(|e| ForeignEntry {
                at_ms: foreign_ms(e.at_ms),
                ..*e
            })
            .collect();
        sorted.sort_by_key(|e| (e.at_ms, e.index));
        let mut rest = sorted.as_slice();
        while let Some(first) = rest.first() {
            let len = rest
                .iter()
                .position(|e| e.at_ms > first.at_ms.saturating_add(BATCH_SPREAD_MS))
                .unwrap_or(rest.len());
            let (batch, after) = rest.split_at(len);
            rest = after;
            let mut value = String::with_capacity(batch.iter().map(|e| e.json.len() + 24).sum());
            value.push('[');
            for (i, e) in batch.iter().enumerate() {
                if i > 0 {
                    value.push(',');
                }
                let _ = write!(value, "[{},{}]", e.at_ms, e.json);
            }
            value.push(']');
            let latest = batch.last().map_or(first.at_ms, |e| e.at_ms);
            let index = batch.iter().map(|e| e.index).min().unwrap_or(0);
            let seq = FOREIGN | (offset << 16) | (index as u64 & 0xffff);
            self.insert_audit(value.as_bytes(), latest.saturating_mul(1000), Some(seq))?;
        }
        Ok(())
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
        let at_ms = foreign_ms(at_ms);
        let at_us = at_ms.saturating_mul(1000);
        let mine = |e: &Key<'_>| e.idempotency_key.as_deref() == Some(key);
        let t = self.trees()?;
        // Entries of this millisecond, alone or in a batch filed up to the spread after it.
        let end = at_us.saturating_add(BATCH_SPREAD_US + 1000);
        for item in t.audit.range(at_us.to_be_bytes()..end.to_be_bytes()) {
            let (k, v) = item?;
            if !is_foreign(&k) {
                continue;
            }
            let found = if is_batch(&v) {
                serde_json::from_slice::<Vec<(u64, Key<'_>)>>(&v)
                    .is_ok_and(|batch| batch.iter().any(|(at, e)| *at == at_ms && mine(e)))
            } else {
                key_micros(&k) == Some(at_us)
                    && serde_json::from_slice::<Key>(&v).is_ok_and(|e| mine(&e))
            };
            if found {
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

    /// Audit entries with timestamps in `[since, until)` (microseconds since the epoch), oldest
    /// first. A batch of other pods' entries is filed under its latest time, so the keys read
    /// run up to [`BATCH_SPREAD_MS`] past `until`, and each entry is kept or left by its own
    /// time.
    pub fn audit_range(
        &self,
        since_us: u64,
        until_us: u64,
    ) -> impl Iterator<Item = Result<AuditEntry, StoreError>> {
        let start = since_us.to_be_bytes();
        let end = until_us.saturating_add(BATCH_SPREAD_US).to_be_bytes();
        let (range, opened) = match self.trees() {
            Ok(t) => (Some(t.audit.range(start..end)), None),
            Err(e) => (None, Some(Err(e))),
        };
        let entries = InTimeOrder {
            items: range.into_iter().flatten(),
            since_us,
            until_us,
            pending: BinaryHeap::new(),
            max_pending: MAX_PENDING,
            horizon: 0,
            count: 0,
            done: false,
        };
        opened.into_iter().chain(entries)
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

    /// How many entries the trail holds (a batch counts its entries).
    pub fn audit_len(&self) -> usize {
        #[derive(Deserialize)]
        struct Count(Vec<IgnoredAny>);
        let Ok(t) = self.trees() else { return 0 };
        t.audit
            .iter()
            .flatten()
            .map(|(_, v)| {
                if is_batch(&v) {
                    serde_json::from_slice::<Count>(&v).map_or(1, |c| c.0.len())
                } else {
                    1
                }
            })
            .sum()
    }
}

/// An entry read and not yet handed out, ordered by time, then by the order it was read in.
struct Pending {
    at_us: u64,
    n: u64,
    entry: AuditEntry,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.at_us, self.n) == (other.at_us, other.n)
    }
}

impl Eq for Pending {}

impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pending {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (self.at_us, self.n).cmp(&(other.at_us, other.n))
    }
}

/// The entries of a range of audit keys, one by one in time order: an entry is handed out
/// once the keys read have passed its time by more than the spread of a batch, since no
/// value read later can hold an earlier entry. What waits is at most a spread's worth.
struct InTimeOrder<I> {
    items: I,
    since_us: u64,
    until_us: u64,
    pending: BinaryHeap<Reverse<Pending>>,
    max_pending: usize,
    /// Every entry of a key still to be read lies at or after this time.
    horizon: u64,
    count: u64,
    done: bool,
}

impl<I> Iterator for InTimeOrder<I>
where
    I: Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
{
    type Item = Result<AuditEntry, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(Reverse(first)) = self.pending.peek() {
                if self.done || first.at_us < self.horizon || self.pending.len() > self.max_pending
                {
                    return self.pending.pop().map(|Reverse(p)| Ok(p.entry));
                }
            } else if self.done {
                return None;
            }
            match self.items.next() {
                None => self.done = true,
                Some(Err(e)) => return Some(Err(e.into())),
                Some(Ok((k, v))) => {
                    self.horizon = key_micros(&k).unwrap_or(0).saturating_sub(BATCH_SPREAD_US);
                    let entries = match decode_value(&k, &v) {
                        Ok(entries) => entries,
                        Err(e) => return Some(Err(e)),
                    };
                    for (at_us, entry) in entries {
                        if at_us >= self.since_us && at_us < self.until_us {
                            self.count += 1;
                            self.pending.push(Reverse(Pending {
                                at_us,
                                n: self.count,
                                entry,
                            }));
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
