//! Idempotency records: one per key, `in_progress` → `completed` / `failed` (SPEC §5).

use super::{now_ms, Store, StoreError};
use crate::event::ResultEvent;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdemState {
    InProgress,
    Completed,
    Failed,
    /// Sent, no usable answer: Genesys may have created the session. Replayed, never re-sent,
    /// until an operator clears it (`dlq replay --force`).
    Unknown,
}

impl IdemState {
    /// A state a redelivery replays instead of calling Genesys.
    pub fn is_final(self) -> bool {
        matches!(self, IdemState::Completed | IdemState::Unknown)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdemRecord {
    pub state: IdemState,
    /// SHA-256 of the canonical request body; a different body under the same key is a conflict.
    pub fingerprint: String,
    /// API attempts made so far, over every delivery of this key.
    pub attempts: u32,
    pub conversation_id: Option<String>,
    /// The result event, re-published when the key comes again.
    pub event: Option<ResultEvent>,
    pub worker_id: String,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

/// What [`Store::claim`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// Go ahead; the key is now `in_progress`. `attempts` were made by earlier deliveries
    /// (a stale `in_progress` left by a crash, or a `failed` key published again).
    Proceed { attempts: u32 },
    /// Already done: re-publish the stored event, make no API call.
    Completed(IdemRecord),
    /// The key was used with another body.
    Conflict(IdemRecord),
}

/// How often [`Store::claim`] reads a key again that changed between its read and its write
/// (only the ledger reader writes a key beside the worker that holds its lock, once an
/// outcome: a second change in a row is all but impossible).
const CLAIM_TRIES: usize = 8;

impl Store {
    pub fn get(&self, key: &str) -> Result<Option<IdemRecord>, StoreError> {
        match self.trees()?.idem.get(key.as_bytes())? {
            Some(bytes) => decode(key, &bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Only the state of `key`'s record: the rest is skipped, not built (the ledger reader
    /// asks this for every record it applies).
    pub fn state_of(&self, key: &str) -> Result<Option<IdemState>, StoreError> {
        #[derive(Deserialize)]
        struct StateOnly {
            state: IdemState,
        }
        match self.trees()?.idem.get(key.as_bytes())? {
            Some(bytes) => serde_json::from_slice::<StateOnly>(&bytes)
                .map(|r| Some(r.state))
                .map_err(|e| StoreError::Corrupt {
                    key: key.to_string(),
                    message: e.to_string(),
                }),
            None => Ok(None),
        }
    }

    /// Take the key for processing. Callers serialize on the key in-process (see
    /// `worker::KeyLocks`), so an `in_progress` record found here was left by a crash.
    ///
    /// The fleet ledger's reader may store an outcome for the key between the read and the
    /// write: the write is a compare-and-swap against what was read, so such an outcome is
    /// never overwritten with `in_progress`; the key is read again instead.
    pub fn claim(
        &self,
        key: &str,
        fingerprint: &str,
        worker_id: &str,
    ) -> Result<Claim, StoreError> {
        for _ in 0..CLAIM_TRIES {
            let read = self.trees()?.idem.get(key.as_bytes())?;
            if let Some(claim) = self.claim_as_read(key, fingerprint, worker_id, read)? {
                return Ok(claim);
            }
        }
        Err(StoreError::Contended {
            key: key.to_string(),
        })
    }

    /// [`Store::claim`] on the record as `read`; `None` if it changed since.
    pub(super) fn claim_as_read(
        &self,
        key: &str,
        fingerprint: &str,
        worker_id: &str,
        read: Option<sled::IVec>,
    ) -> Result<Option<Claim>, StoreError> {
        let now = now_ms();
        let ttl_ms = self.shared.idempotency_ttl.as_millis() as u64;
        let existing = match &read {
            Some(bytes) => Some(decode(key, bytes)?),
            None => None,
        }
        .filter(|r| r.updated_at_ms.saturating_add(ttl_ms) >= now);
        let attempts = match existing {
            Some(rec) if rec.fingerprint != fingerprint => return Ok(Some(Claim::Conflict(rec))),
            Some(rec) if rec.state.is_final() => return Ok(Some(Claim::Completed(rec))),
            Some(rec) => {
                if rec.state == IdemState::InProgress {
                    tracing::info!(idempotency_key = key, previous_worker = %rec.worker_id, "resuming a key left in progress");
                }
                rec.attempts
            }
            None => 0,
        };
        let record = IdemRecord {
            state: IdemState::InProgress,
            fingerprint: fingerprint.to_string(),
            attempts,
            conversation_id: None,
            event: None,
            worker_id: worker_id.to_string(),
            created_at_ms: now,
            updated_at_ms: now,
        };
        let bytes = serde_json::to_vec(&record).map_err(|e| StoreError::Io(e.to_string()))?;
        let swapped = self.write(|t| {
            Ok(t.idem
                .compare_and_swap(key.as_bytes(), read, Some(bytes.as_slice()))?)
        })?;
        Ok(swapped.ok().map(|()| Claim::Proceed { attempts }))
    }

    /// Keep the API attempts made so far on the key's record (a delayed retry, an auth pause),
    /// so the next delivery continues the count. A record with another body is left alone.
    pub fn record_attempts(
        &self,
        key: &str,
        fingerprint: &str,
        attempts: u32,
    ) -> Result<(), StoreError> {
        if let Some(mut rec) = self.get(key)? {
            if rec.fingerprint == fingerprint {
                rec.attempts = attempts;
                rec.updated_at_ms = now_ms();
                self.put(key, &rec)?;
            }
        }
        Ok(())
    }

    /// Forget a key (an operator cleared its `unknown` outcome).
    pub fn remove(&self, key: &str) -> Result<(), StoreError> {
        self.write(|t| Ok(t.idem.remove(key.as_bytes()).map(drop)?))
    }

    /// Store a record given as its JSON (a fleet ledger record, parsed and checked first).
    pub fn put_json(&self, key: &str, json: &str) -> Result<(), StoreError> {
        // A slice, not a `Vec`: sled copies the value into its own buffer either way.
        self.write(|t| Ok(t.idem.insert(key.as_bytes(), json.as_bytes()).map(drop)?))
    }

    pub fn put(&self, key: &str, record: &IdemRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record).map_err(|e| StoreError::Io(e.to_string()))?;
        self.write(|t| Ok(t.idem.insert(key.as_bytes(), bytes.as_slice()).map(drop)?))
    }
}

fn decode(key: &str, bytes: &[u8]) -> Result<IdemRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })
}
