//! This pod's view of the live claims of the fleet ledger, held in memory by the ledger reader.
//!
//! Every claim and outcome of every pod passes through here, so the view is kept in memory
//! rather than as a store write per record; it stays small (the keys in flight across the
//! fleet, plus the claims of pods that died until their keys end). It is saved to the store
//! with the offset it reflects every [`SNAPSHOT_EVERY`] and when the reader stops, and loaded
//! at start, so a restart replays only the ledger after the snapshot: records the store has
//! already applied change the view alone ([`super::apply`]'s `replay`).

use crate::store::{ClaimsSnapshot, FleetClaim, Store, StoreError};
use std::collections::HashMap;
use std::time::Duration;

/// How often the reader saves the view while it applies records.
pub const SNAPSHOT_EVERY: Duration = Duration::from_secs(2);

/// The live claims by key, and the ledger offset they reflect.
#[derive(Debug, Default, PartialEq)]
pub struct Claims {
    live: HashMap<String, FleetClaim>,
    /// The last ledger offset the view reflects.
    offset: Option<u64>,
}

impl Claims {
    /// The view as the store last saved it: the snapshot, or for a store of an earlier
    /// version its claims tree and its ledger offset.
    pub fn load(store: &Store) -> Result<Self, StoreError> {
        if let Some(snap) = store.claims_snapshot()? {
            return Ok(Self {
                live: snap.claims.into_iter().collect(),
                offset: Some(snap.offset),
            });
        }
        Ok(Self {
            live: store.legacy_fleet_claims()?.into_iter().collect(),
            offset: store.ledger_offset()?,
        })
    }

    /// [`Claims::load`], or, when the saved claims cannot be read (a damaged snapshot), none
    /// and no offset: the reader then reads the whole ledger again, applying what the store
    /// already holds to the claims alone, which rebuilds them exactly. Slower, never wrong,
    /// and the pod does not start with claims missing.
    pub fn load_or_rebuild(store: &Store) -> Self {
        Self::load(store).unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot read the saved fleet claims; rebuilding them from the whole ledger");
            Self::default()
        })
    }

    /// The claims as the store saved them last, for a reader that only looks (replay plans);
    /// none when they cannot be read, with a warning.
    pub fn saved(store: &Store) -> Self {
        Self::load(store).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the saved fleet claims; taking none as held");
            Self::default()
        })
    }

    /// The last ledger offset the view reflects (`None`: read the ledger from the start).
    pub fn offset(&self) -> Option<u64> {
        self.offset
    }

    pub fn set_offset(&mut self, offset: u64) {
        self.offset = Some(offset);
    }

    pub fn get(&self, key: &str) -> Option<&FleetClaim> {
        self.live.get(key)
    }

    /// Which of `keys` a claim live at `now_ms` holds, with the pod holding it.
    pub fn holders(&self, keys: Vec<String>, now_ms: u64) -> Vec<(String, String)> {
        keys.into_iter()
            .filter_map(|k| {
                let holder = self.live.get(&k).filter(|c| c.live_at(now_ms))?;
                let pod = holder.worker_id.clone();
                Some((k, pod))
            })
            .collect()
    }

    pub fn insert(&mut self, key: &str, claim: FleetClaim) {
        match self.live.get_mut(key) {
            Some(held) => *held = claim,
            None => {
                self.live.insert(key.to_string(), claim);
            }
        }
    }

    pub fn remove(&mut self, key: &str) {
        self.live.remove(key);
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Forget claims whose lease lapsed more than `keep` ago (a pod that died and never came
    /// back, a key never finished): they can no longer block anybody. Returns how many.
    pub fn prune(&mut self, now_ms: u64, keep: Duration) -> usize {
        let before = self.live.len();
        let keep_ms = keep.as_millis() as u64;
        self.live
            .retain(|_, c| c.at_ms.saturating_add(c.lease_ms).saturating_add(keep_ms) >= now_ms);
        before - self.live.len()
    }

    /// Save the view with its offset (nothing to save before the first record).
    pub fn save(&self, store: &Store) -> Result<(), StoreError> {
        let Some(offset) = self.offset else {
            return Ok(());
        };
        store.save_claims_snapshot(&ClaimsSnapshot {
            offset,
            claims: self
                .live
                .iter()
                .map(|(k, c)| (k.clone(), c.clone()))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(at_ms: u64) -> FleetClaim {
        FleetClaim::for_test(at_ms)
    }

    #[tokio::test]
    async fn saved_claims_load_back_with_their_offset_and_lapsed_ones_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Duration::from_secs(3600)).unwrap();
        let mut c = Claims::load(&store).unwrap();
        assert_eq!((c.offset(), c.len()), (None, 0));
        c.insert("old", claim(1_000));
        c.insert("live", claim(60_000));
        c.set_offset(9);
        c.save(&store).unwrap();
        let back = Claims::load(&store).unwrap();
        assert_eq!((back.offset(), back.len()), (Some(9), 2));
        assert_eq!(back.get("live"), Some(&claim(60_000)));
        // "old" lapsed at 2,000; kept 10 s more, gone at 12,001.
        c.prune(12_000, Duration::from_secs(10));
        assert_eq!(c.len(), 2);
        assert_eq!(c.prune(12_001, Duration::from_secs(10)), 1);
        assert!(c.get("old").is_none());
    }

    #[tokio::test]
    async fn a_damaged_snapshot_means_reading_the_whole_ledger_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Duration::from_secs(3600)).unwrap();
        store.set_ledger_offset(40).unwrap();
        store
            .put_meta_for_test(b"claims_snapshot", b"{not json")
            .unwrap();
        assert!(Claims::load(&store).is_err());
        let c = Claims::load_or_rebuild(&store);
        assert_eq!((c.offset(), c.len()), (None, 0));
    }

    #[tokio::test]
    async fn a_store_of_an_earlier_version_gives_its_claims_tree_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Duration::from_secs(3600)).unwrap();
        store.put_legacy_fleet_claim("k", &claim(5)).unwrap();
        store.set_ledger_offset(77).unwrap();
        let c = Claims::load(&store).unwrap();
        assert_eq!((c.offset(), c.get("k")), (Some(77), Some(&claim(5))));
    }
}
