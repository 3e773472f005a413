//! The worker binary's memory allocator: glibc's malloc, except while a pod catches up on a
//! long ledger, when new blocks come from mimalloc.
//!
//! Why two. Restoring a store from the ledger is sled inserting hundreds of thousands of
//! records, and under sled glibc's malloc is a third of the CPU: sled frees its nodes on other
//! threads than the ones that made them, and glibc then waits on the other arena's lock.
//! mimalloc frees such blocks without a lock and restores about twice as fast, but a pod that
//! runs on it for good holds 13–110 MiB more while it works (docs/performance.md). Memory is
//! paid by every pod all the time, the restore only when a pod starts behind, so the worker
//! takes mimalloc for the restore alone ([`Fast`]).
//!
//! How a block finds its way back. A block is freed (or grown) by the allocator it came from,
//! whatever the phase: `mi_is_in_heap_region` tells mimalloc's blocks apart by address (its
//! segment map and arenas, which glibc's blocks never lie in). Blocks that outlive the
//! restore (sled's cache, the live claims) stay in mimalloc until they are freed; mimalloc
//! returns its emptied pages to the system on its own.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// How many [`Fast`] guards are alive: while any is, new blocks come from mimalloc.
static FAST: AtomicUsize = AtomicUsize::new(0);

/// Set by the first [`Fast`]: until then no block is mimalloc's, and a free need not ask.
static EVER_FAST: AtomicBool = AtomicBool::new(false);

/// The allocator `main.rs` installs. In a process that installs another, [`Fast`] does
/// nothing.
pub struct PhaseAlloc;

/// While a `Fast` lives, [`PhaseAlloc`] takes new blocks from mimalloc.
#[must_use = "the fast phase ends when the guard is dropped"]
pub struct Fast(());

impl Fast {
    pub fn begin() -> Self {
        // Before the phase counts, and released with it: a thread that sees the phase (and so
        // makes a mimalloc block) sees this too, and so does every thread it hands the block to.
        EVER_FAST.store(true, Ordering::Relaxed);
        FAST.fetch_add(1, Ordering::Release);
        Fast(())
    }
}

impl Drop for Fast {
    fn drop(&mut self) {
        FAST.fetch_sub(1, Ordering::Relaxed);
    }
}

fn fast() -> bool {
    FAST.load(Ordering::Acquire) > 0
}

fn from_mimalloc(ptr: *mut u8) -> bool {
    if !EVER_FAST.load(Ordering::Relaxed) {
        return false;
    }
    // SAFETY: a pure lookup in mimalloc's segment map and arena list; any address may be asked.
    unsafe { libmimalloc_sys::mi_is_in_heap_region(ptr as *const c_void) }
}

// SAFETY: every block is freed or grown by the allocator that made it (`from_mimalloc`), and
// both honour the layout's size and alignment.
unsafe impl GlobalAlloc for PhaseAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if fast() {
            libmimalloc_sys::mi_malloc_aligned(layout.size(), layout.align()).cast()
        } else {
            System.alloc(layout)
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if fast() {
            libmimalloc_sys::mi_zalloc_aligned(layout.size(), layout.align()).cast()
        } else {
            System.alloc_zeroed(layout)
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if from_mimalloc(ptr) {
            libmimalloc_sys::mi_free(ptr.cast());
        } else {
            System.dealloc(ptr, layout)
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if from_mimalloc(ptr) {
            libmimalloc_sys::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
        } else {
            System.realloc(ptr, layout, new_size)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// The phase counter is process-wide: tests that start a phase or assert on one take
    /// turns. (The test binary keeps Rust's default allocator; each test drives a
    /// `PhaseAlloc` by hand.)
    static PHASE: Mutex<()> = Mutex::new(());

    fn fill(ptr: *mut u8, len: usize, byte: u8) {
        // SAFETY: `ptr` is a live block of at least `len` bytes.
        unsafe { std::ptr::write_bytes(ptr, byte, len) }
    }

    #[test]
    fn a_block_is_freed_and_grown_by_the_allocator_it_came_from_whatever_the_phase() {
        let _turn = PHASE.lock().unwrap_or_else(|p| p.into_inner());
        let a = PhaseAlloc;
        let small = Layout::from_size_align(100, 8).unwrap();
        let page = Layout::from_size_align(4096, 8).unwrap();
        // SAFETY: each block is used within its size and freed once, with its layout.
        unsafe {
            let before = a.alloc(small);
            assert!(
                !from_mimalloc(before),
                "outside the phase, blocks are glibc's"
            );
            let fast = Fast::begin();
            let made_fast = a.alloc(small);
            assert!(
                from_mimalloc(made_fast),
                "in the phase, blocks are mimalloc's"
            );
            let grown = a.realloc(before, small, page.size());
            assert!(
                !from_mimalloc(grown),
                "a glibc block grown in the phase stays glibc's"
            );
            fill(grown, page.size(), 1);
            a.dealloc(grown, page);
            drop(fast);
            let after = a.alloc(small);
            assert!(
                !from_mimalloc(after),
                "after the phase, blocks are glibc's again"
            );
            a.dealloc(after, small);
            fill(made_fast, small.size(), 2);
            let grown = a.realloc(made_fast, small, 1 << 20);
            assert!(
                from_mimalloc(grown),
                "a mimalloc block grown after the phase stays mimalloc's"
            );
            assert_eq!(*grown.add(99), 2, "growing keeps the contents");
            fill(grown, 1 << 20, 3);
            a.dealloc(grown, Layout::from_size_align(1 << 20, 8).unwrap());
        }
    }

    #[test]
    fn large_alignments_and_zeroed_blocks_hold_in_both_phases() {
        let _turn = PHASE.lock().unwrap_or_else(|p| p.into_inner());
        let a = PhaseAlloc;
        for align in [8usize, 64, 4096, 1 << 16] {
            let layout = Layout::from_size_align(3 * align, align).unwrap();
            for in_phase in [false, true] {
                let _fast = in_phase.then(Fast::begin);
                // SAFETY: the block is read within its size and freed once, with its layout.
                unsafe {
                    let p = a.alloc_zeroed(layout);
                    assert!(!p.is_null());
                    assert_eq!(from_mimalloc(p), in_phase);
                    assert_eq!(p as usize % align, 0, "align {align}");
                    assert!(std::slice::from_raw_parts(p, layout.size())
                        .iter()
                        .all(|b| *b == 0));
                    a.dealloc(p, layout);
                }
            }
        }
    }
}
