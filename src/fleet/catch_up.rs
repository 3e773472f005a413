//! A pod's first catch-up with the fleet ledger: the records it applies, and past
//! [`FAST_AFTER`] of them (a restore, not a pod that was down a moment) the allocator's fast
//! phase ([`crate::alloc::Fast`]), ended at the catch-up or when the reader stops.

use crate::alloc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Records applied before the first catch-up after which the reader takes the allocator's
/// fast phase ([`alloc::Fast`]): a restore, not a pod that was down a moment.
pub const FAST_AFTER: u64 = 10_000;

#[derive(Default)]
pub struct FirstCatchUp {
    over: AtomicBool,
    applied: AtomicU64,
    fast: Mutex<Option<alloc::Fast>>,
}

impl FirstCatchUp {
    pub fn applied(&self) {
        if !self.over.load(Ordering::Relaxed)
            && self.applied.fetch_add(1, Ordering::Relaxed) + 1 == FAST_AFTER
        {
            tracing::info!(
                records = FAST_AFTER,
                "a long ledger to catch up on: restoring with the fast allocator"
            );
            *self.fast() = Some(alloc::Fast::begin());
        }
    }

    pub fn end(&self) {
        self.over.store(true, Ordering::Relaxed);
        self.fast().take();
    }

    fn fast(&self) -> MutexGuard<'_, Option<alloc::Fast>> {
        self.fast.lock().unwrap_or_else(|p| p.into_inner())
    }
}
