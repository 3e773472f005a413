//! What this pod keeps of the fleet ledger (the broker stream) besides the outcomes, which land
//! in the idempotency tree like local ones: the offset of the last ledger record applied (a
//! restart resumes instead of replaying), and a snapshot of the live claims.
//!
//! The live claims themselves are held in memory by the ledger reader (`fleet::claims`);
//! every few seconds, and when it stops, it saves them here with the offset they reflect, so
//! a restart loads them and replays only the ledger after that offset. Stores written by
//! earlier versions kept one record per claim in the `fleet_claims` tree; they are read once
//! and the tree is emptied when the first snapshot is saved.

use super::{Store, StoreError};
use serde::{Deserialize, Serialize};

pub(super) const CLAIMS_TREE: &str = "fleet_claims";
pub(super) const META_TREE: &str = "meta";
const LEDGER_OFFSET: &[u8] = b"ledger_offset";
const CLAIMS_SNAPSHOT: &[u8] = b"claims_snapshot";

/// A pod's claim on a key, as the ledger recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetClaim {
    pub claim_id: String,
    pub worker_id: String,
    pub fingerprint: String,
    /// When the claim was made or last renewed (the claiming pod's clock, ms since the epoch).
    pub at_ms: u64,
    pub lease_ms: u64,
}

impl FleetClaim {
    /// Whether the claim still holds at `now_ms` (by the clock of whoever asks).
    pub fn live_at(&self, now_ms: u64) -> bool {
        now_ms < self.at_ms.saturating_add(self.lease_ms)
    }

    /// Tests: claim `c` of pod `w`, made at `at_ms` with a 1 s lease.
    #[cfg(test)]
    pub(crate) fn for_test(at_ms: u64) -> Self {
        FleetClaim {
            claim_id: "c".into(),
            worker_id: "w".into(),
            fingerprint: "fp".into(),
            at_ms,
            lease_ms: 1_000,
        }
    }
}

/// The live claims as of a ledger offset.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClaimsSnapshot {
    /// The last ledger record the claims reflect.
    pub offset: u64,
    pub claims: Vec<(String, FleetClaim)>,
}

impl Store {
    /// The claims saved by the last [`Store::save_claims_snapshot`], if any.
    pub fn claims_snapshot(&self) -> Result<Option<ClaimsSnapshot>, StoreError> {
        match self.trees()?.meta.get(CLAIMS_SNAPSHOT)? {
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| StoreError::Corrupt {
                        key: format!("{META_TREE}/claims_snapshot"),
                        message: e.to_string(),
                    })
            }
            None => Ok(None),
        }
    }

    /// Save the live claims as of a ledger offset; the first save empties the claims tree of
    /// earlier versions.
    pub fn save_claims_snapshot(&self, snapshot: &ClaimsSnapshot) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(snapshot).map_err(|e| StoreError::Io(e.to_string()))?;
        self.write(|t| {
            t.meta.insert(CLAIMS_SNAPSHOT, bytes)?;
            if !t.claims.is_empty() {
                t.claims.clear()?;
            }
            Ok(())
        })
    }

    /// The claims an earlier version kept one record each (read when there is no snapshot).
    /// A record that does not parse is left out: it could only block a key, never free one
    /// wrongly, and its lease has long lapsed by the time anybody upgrades.
    pub fn legacy_fleet_claims(&self) -> Result<Vec<(String, FleetClaim)>, StoreError> {
        let mut out = Vec::new();
        for item in self.trees()?.claims.iter() {
            let (k, v) = item?;
            if let (Ok(key), Ok(claim)) = (
                String::from_utf8(k.to_vec()),
                serde_json::from_slice::<FleetClaim>(&v),
            ) {
                out.push((key, claim));
            }
        }
        Ok(out)
    }

    /// Whether the store is new (a new pod, or a lost volume): no idempotency record, no audit
    /// entry, no ledger offset.
    pub fn is_new(&self) -> Result<bool, StoreError> {
        let t = self.trees()?;
        Ok(t.idem.is_empty() && t.audit.is_empty() && t.meta.get(LEDGER_OFFSET)?.is_none())
    }

    /// The offset of the last ledger record applied to this store.
    pub fn ledger_offset(&self) -> Result<Option<u64>, StoreError> {
        Ok(self.trees()?.meta.get(LEDGER_OFFSET)?.and_then(|v| {
            let bytes: [u8; 8] = v.as_ref().try_into().ok()?;
            Some(u64::from_be_bytes(bytes))
        }))
    }

    pub fn set_ledger_offset(&self, offset: u64) -> Result<(), StoreError> {
        self.write(|t| {
            Ok(t.meta
                .insert(LEDGER_OFFSET, &offset.to_be_bytes())
                .map(drop)?)
        })
    }

    /// Tests: write raw bytes under a `meta` key (a damaged snapshot, say).
    #[cfg(test)]
    pub(crate) fn put_meta_for_test(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.write(|t| Ok(t.meta.insert(key, value).map(drop)?))
    }

    /// Test and upgrade helper: write one claim the way earlier versions did.
    #[doc(hidden)]
    pub fn put_legacy_fleet_claim(&self, key: &str, claim: &FleetClaim) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(claim).map_err(|e| StoreError::Io(e.to_string()))?;
        self.write(|t| Ok(t.claims.insert(key.as_bytes(), bytes).map(drop)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn claim(at_ms: u64) -> FleetClaim {
        FleetClaim::for_test(at_ms)
    }

    #[tokio::test]
    async fn a_snapshot_round_trips_and_replaces_the_legacy_claims() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), Duration::from_secs(3600)).unwrap();
        assert_eq!(s.claims_snapshot().unwrap(), None);
        s.put_legacy_fleet_claim("old", &claim(5)).unwrap();
        assert_eq!(
            s.legacy_fleet_claims().unwrap(),
            vec![("old".to_string(), claim(5))]
        );
        let snap = ClaimsSnapshot {
            offset: 41,
            claims: vec![("k".into(), claim(7))],
        };
        s.save_claims_snapshot(&snap).unwrap();
        assert_eq!(s.claims_snapshot().unwrap(), Some(snap));
        assert!(s.legacy_fleet_claims().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_store_is_new_until_it_holds_a_record_an_audit_entry_or_an_offset() {
        let fresh = || {
            let dir = tempfile::tempdir().unwrap();
            let s = Store::open(dir.path(), Duration::from_secs(3600)).unwrap();
            (dir, s)
        };
        let (_a, s) = fresh();
        assert!(s.is_new().unwrap());
        s.put_json("k", "{}").unwrap();
        assert!(!s.is_new().unwrap());
        let (_b, s) = fresh();
        s.append_audit(&Default::default()).unwrap();
        assert!(!s.is_new().unwrap());
        let (_c, s) = fresh();
        s.set_ledger_offset(0).unwrap();
        assert!(!s.is_new().unwrap());
    }
}
