//! This pod's materialized view of the fleet ledger (the broker stream): which pod holds a live
//! claim on which key, and the offset of the last ledger record applied, so a restart resumes
//! instead of replaying. Outcomes from the ledger land in the idempotency tree like local ones.

use super::{Store, StoreError};
use serde::{Deserialize, Serialize};

pub(super) const CLAIMS_TREE: &str = "fleet_claims";
pub(super) const META_TREE: &str = "meta";
const LEDGER_OFFSET: &[u8] = b"ledger_offset";

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
}

impl Store {
    /// The live claim on `key`, if the ledger recorded one.
    pub fn fleet_claim(&self, key: &str) -> Result<Option<FleetClaim>, StoreError> {
        match self.trees()?.claims.get(key.as_bytes())? {
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| StoreError::Corrupt {
                        key: format!("{CLAIMS_TREE}/{key}"),
                        message: e.to_string(),
                    })
            }
            None => Ok(None),
        }
    }

    pub fn put_fleet_claim(&self, key: &str, claim: &FleetClaim) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(claim).map_err(|e| StoreError::Io(e.to_string()))?;
        self.write(|t| Ok(t.claims.insert(key.as_bytes(), bytes).map(drop)?))
    }

    pub fn remove_fleet_claim(&self, key: &str) -> Result<(), StoreError> {
        // Most outcomes find no claim left here; a read is cheaper than a removal.
        self.write(|t| {
            if t.claims.contains_key(key.as_bytes())? {
                t.claims.remove(key.as_bytes())?;
            }
            Ok(())
        })
    }

    /// Forget claims whose lease lapsed more than `ttl_ms` ago (a pod that died and never came
    /// back, a key never finished): they can no longer block anybody. Returns how many.
    pub(super) fn prune_fleet_claims(&self, now_ms: u64, ttl_ms: u64) -> Result<usize, StoreError> {
        let mut removed = 0;
        let claims = self.trees()?.claims.clone();
        for item in claims.iter() {
            let (k, v) = item?;
            let dead = match serde_json::from_slice::<FleetClaim>(&v) {
                Ok(c) => c.at_ms.saturating_add(c.lease_ms).saturating_add(ttl_ms) < now_ms,
                Err(_) => true,
            };
            if dead {
                claims.remove(k)?;
                removed += 1;
            }
        }
        Ok(removed)
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn lapsed_claims_are_pruned_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), Duration::from_millis(10)).unwrap();
        let claim = |at_ms| FleetClaim {
            claim_id: "c".into(),
            worker_id: "w".into(),
            fingerprint: "fp".into(),
            at_ms,
            lease_ms: 1_000,
        };
        let now = super::super::now_ms();
        s.put_fleet_claim("old", &claim(now - 60_000)).unwrap();
        s.put_fleet_claim("live", &claim(now)).unwrap();
        assert_eq!(s.prune(Duration::from_secs(3600)).unwrap().0, 1);
        assert!(s.fleet_claim("old").unwrap().is_none());
        assert!(s.fleet_claim("live").unwrap().is_some());
    }
}
