//! A failing store heals itself: once a write or flush fails, sled refuses every later write
//! until the database is opened again, so the healer task probes the store every
//! [`HEAL_EVERY`] and, when a probe fails and the volume has room, reopens sled in place. The
//! first probe that writes and flushes ends the failure ([`Store::failure`] clears).

use super::{now_ms, open_trees, Shared, Store, StoreError, Trees};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::watch;

/// How often a failing store is probed (and reopened) until a write succeeds.
pub const HEAL_EVERY: Duration = Duration::from_secs(1);

/// Wait for the store to fail, then probe it every [`HEAL_EVERY`] (reopening it when a probe
/// fails) until a write and flush succeed. Ends with the store.
pub(super) async fn healer(shared: Weak<Shared>, mut failures: watch::Receiver<Option<String>>) {
    loop {
        if failures.wait_for(Option::is_some).await.is_err() {
            return;
        }
        let began = std::time::Instant::now();
        loop {
            tokio::time::sleep(HEAL_EVERY).await;
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let store = Store { shared };
            let probe = store.clone();
            let healed = tokio::task::spawn_blocking(move || probe.heal())
                .await
                .unwrap_or_else(|e| Err(StoreError::Io(e.to_string())));
            match healed {
                Ok(()) => {
                    store.shared.failure.send_replace(None);
                    crate::internal_events::store_recovered(began.elapsed());
                    break;
                }
                Err(e) => tracing::debug!(error = %e, "the store still fails writes"),
            }
        }
    }
}

const PROBE_KEY: &[u8] = b"write_probe";

/// Room a reopen needs beyond sled's snapshot: opening rewrites sled's `conf` and snapshot
/// files, and on a volume without room they are left empty and the store no longer opens
/// (seen on a full tmpfs). So a reopen waits until this much can be written.
const REOPEN_ROOM: u64 = 8 * 1024 * 1024;

/// Write (and remove) a file as large as a reopen may need: `REOPEN_ROOM` plus twice the
/// snapshot files. An error says there is no room yet.
fn room_to_reopen(dir: &Path) -> Result<(), StoreError> {
    use std::io::Write;
    let snapshots: u64 = std::fs::read_dir(dir)
        .map_err(|e| StoreError::Io(e.to_string()))?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("snap."))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    let need = REOPEN_ROOM + 2 * snapshots;
    let probe = dir.join(".room-probe");
    let written = (|| {
        let mut f = std::fs::File::create(&probe)?;
        let block = vec![0u8; 1024 * 1024];
        let mut left = need;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            f.write_all(&block[..n])?;
            left -= n as u64;
        }
        f.sync_all()
    })();
    let _ = std::fs::remove_file(&probe);
    written.map_err(|e| {
        StoreError::Io(format!(
            "no room to reopen the store yet ({} MiB needed): {e}",
            need / (1024 * 1024)
        ))
    })
}

impl Store {
    /// Write and flush a probe; if that fails, reopen the database and try once more.
    fn heal(&self) -> Result<(), StoreError> {
        let probe = |t: &Trees| -> Result<(), StoreError> {
            t.meta.insert(PROBE_KEY, &now_ms().to_be_bytes())?;
            t.db.flush()?;
            Ok(())
        };
        if let Ok(t) = self.trees() {
            if probe(&t).is_ok() {
                return Ok(());
            }
        }
        room_to_reopen(&self.shared.path)?;
        self.reopen()?;
        probe(&*self.trees()?)
    }

    /// Drop the failed database and open it again. sled holds a lock on the directory until
    /// every handle to the old database is gone; handles in use finish within moments.
    fn reopen(&self) -> Result<(), StoreError> {
        let slot = || self.shared.trees.write().unwrap_or_else(|p| p.into_inner());
        let old = slot().take();
        drop(old);
        let mut last = None;
        for _ in 0..50 {
            match open_trees(&self.shared.path) {
                Ok(t) => {
                    *slot() = Some(Arc::new(t));
                    self.shared.generation.fetch_add(1, Ordering::SeqCst);
                    return Ok(());
                }
                Err(e @ StoreError::Locked { .. }) => {
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| StoreError::Io("cannot reopen the store".into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_volume_with_room_lets_a_reopen_go_ahead_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        room_to_reopen(dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_healthy_store_heals_at_once_and_a_reopened_one_keeps_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Duration::from_secs(60)).unwrap();
        store.set_ledger_offset(7).unwrap();
        store.durable().await.unwrap();
        let before = store.generation();
        store.heal().unwrap();
        assert_eq!(store.generation(), before, "no reopen needed");
        store.reopen().unwrap();
        assert_eq!(store.generation(), before + 1);
        assert_eq!(store.ledger_offset().unwrap(), Some(7));
    }
}
