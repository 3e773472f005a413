//! Per-key locks inside one process: two deliveries of the same idempotency key never run their
//! claim-call-finish concurrently here, so an `in_progress` record seen while holding the lock
//! can only have been left by a crash.

use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::OwnedMutexGuard;

#[derive(Default)]
pub struct KeyLocks {
    map: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Held while one delivery works on its key; dropping it lets the next one in.
pub struct KeyGuard<'a> {
    locks: &'a KeyLocks,
    key: String,
    _guard: OwnedMutexGuard<()>,
}

impl KeyLocks {
    pub async fn lock(&self, key: &str) -> KeyGuard<'_> {
        let m = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key.to_string()).or_default().clone()
        };
        KeyGuard {
            locks: self,
            key: key.to_string(),
            _guard: m.lock_owned().await,
        }
    }

    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.locks.map.lock().unwrap_or_else(|p| p.into_inner());
        // The map and this guard hold one reference each; more means someone is waiting.
        if map
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) <= 2)
        {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn key_locks_serialize_and_clean_up() {
        let locks = Arc::new(KeyLocks::default());
        let g = locks.lock("a").await;
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock("a").await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        // Another key is not blocked.
        drop(locks.lock("b").await);
        drop(g);
        waiter.await.unwrap();
        assert!(locks.is_empty());
    }
}
