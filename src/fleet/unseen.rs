//! Which keys a restoring pod's store cannot hold yet, so its ledger reader need not read the
//! store to find out.
//!
//! A pod that starts on a new store (`Store::is_new`: a new replica, a lost volume) reads the
//! whole ledger before it takes a delivery, and while it does, the reader is the only one
//! writing idempotency records. So a key the reader has not written is not in the store, and
//! the reads it would make for that key's claim and outcome (a walk to the key's leaf in sled,
//! each) would find nothing. [`Unseen`] remembers the keys written so far in a fixed-size
//! blocked Bloom filter: "not seen" is certain, "maybe seen" (a key written, or a false
//! positive) means the store is read as always. Its memory is fixed ([`FILTER_BYTES`])
//! whatever the ledger's length: a longer ledger only makes false positives, and so reads,
//! more frequent.
//!
//! The reader drops it once it has caught up, before the worker takes its first delivery
//! (from then on the worker writes the store too).
//!
//! Its memory is mapped from the kernel, not taken from malloc ([`Words`]): glibc raises its
//! mmap threshold to the size of any mapped block it frees (up to 32 MiB), so an 8 MiB filter
//! freed through malloc would make it keep every later buffer up to 8 MiB in its heap, never
//! given back. Measured (peak RSS draining 100,000 messages, docs/performance.md): 87.8–93.4
//! MiB with the filter from malloc, against 64–68 MiB with it mapped.

use std::hash::{BuildHasher, Hasher};
use std::ptr::NonNull;

/// The filter's size: 64 Mi bits. Measured: a false positive (a needless store read) for
/// 0.12 % of new keys after 4,000,000 keys, 5 % after 10,000,000.
pub const FILTER_BYTES: usize = 8 << 20;

/// Bits set per key, all in one 512-bit block (one cache line).
const BITS_PER_KEY: u32 = 6;

const BLOCK_WORDS: usize = 8;

/// Keys a store that started empty has been given, as a blocked Bloom filter.
pub struct Unseen {
    words: Words,
    blocks: usize,
    hasher: std::collections::hash_map::RandomState,
}

/// Zeroed words, in an anonymous mapping of their own (or, if the kernel refuses one, from the
/// heap).
enum Words {
    Mapped { ptr: NonNull<u64>, len: usize },
    Heap(Vec<u64>),
}

// SAFETY: `Mapped` owns its mapping alone, as a `Vec` owns its buffer.
unsafe impl Send for Words {}
unsafe impl Sync for Words {}

impl Words {
    fn zeroed(len: usize) -> Self {
        let bytes = len * std::mem::size_of::<u64>();
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        match NonNull::new(ptr.cast::<u64>()) {
            Some(ptr) if ptr.as_ptr().cast() != libc::MAP_FAILED => Words::Mapped { ptr, len },
            _ => Words::Heap(vec![0; len]),
        }
    }

    fn as_slice(&self) -> &[u64] {
        match self {
            // SAFETY: the mapping holds `len` words, zeroed by the kernel, alive until drop.
            Words::Mapped { ptr, len } => unsafe { std::slice::from_raw_parts(ptr.as_ptr(), *len) },
            Words::Heap(v) => v,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [u64] {
        match self {
            // SAFETY: as above, and `&mut self` makes this the only reference.
            Words::Mapped { ptr, len } => unsafe {
                std::slice::from_raw_parts_mut(ptr.as_ptr(), *len)
            },
            Words::Heap(v) => v,
        }
    }
}

impl Drop for Words {
    fn drop(&mut self) {
        if let Words::Mapped { ptr, len } = self {
            // SAFETY: the mapping made in `zeroed`, unmapped once.
            unsafe {
                libc::munmap(ptr.as_ptr().cast(), *len * std::mem::size_of::<u64>());
            }
        }
    }
}

impl Unseen {
    pub fn new() -> Self {
        Self::with_bytes(FILTER_BYTES)
    }

    fn with_bytes(bytes: usize) -> Self {
        let blocks = (bytes / (8 * BLOCK_WORDS)).max(1);
        Self {
            words: Words::zeroed(blocks * BLOCK_WORDS),
            blocks,
            hasher: Default::default(),
        }
    }

    /// The key's block and its bits in that block (word, mask), from one 64-bit hash.
    fn place(&self, key: &str) -> (usize, [(usize, u64); BITS_PER_KEY as usize]) {
        let mut h = self.hasher.build_hasher();
        h.write(key.as_bytes());
        let hash = h.finish();
        let block = ((hash >> 32) as usize) % self.blocks;
        let mut bits = [(0, 0); BITS_PER_KEY as usize];
        // Nine bits a position (a word of eight, a bit of 64) from the low 32 bits, and more
        // from a second mix of the hash for the rest.
        let mut pool =
            hash as u32 as u64 | (hash.rotate_left(17).wrapping_mul(0x9E37_79B9_7F4A_7C15) << 32);
        for slot in &mut bits {
            let word = (pool & 0b111) as usize;
            let bit = (pool >> 3) & 0b11_1111;
            *slot = (word, 1u64 << bit);
            pool >>= 9;
        }
        (block, bits)
    }

    /// Note that the store now holds (or may hold) `key`.
    pub fn insert(&mut self, key: &str) {
        let (block, bits) = self.place(key);
        let b = &mut self.words.as_mut_slice()[block * BLOCK_WORDS..][..BLOCK_WORDS];
        for (word, mask) in bits {
            b[word] |= mask;
        }
    }

    /// True when the store certainly holds nothing for `key`.
    pub fn unseen(&self, key: &str) -> bool {
        let (block, bits) = self.place(key);
        let b = &self.words.as_slice()[block * BLOCK_WORDS..][..BLOCK_WORDS];
        bits.iter().any(|&(word, mask)| b[word] & mask == 0)
    }
}

impl Default for Unseen {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_is_mapped_and_zeroed() {
        let u = Unseen::new();
        assert!(matches!(u.words, Words::Mapped { .. }));
        assert!(u.words.as_slice().iter().all(|w| *w == 0));
        assert_eq!(u.words.as_slice().len() * 8, FILTER_BYTES);
    }

    #[test]
    fn a_key_once_inserted_is_never_unseen() {
        let mut u = Unseen::with_bytes(4096);
        for i in 0..20_000 {
            u.insert(&format!("key-{i}"));
        }
        // A filter this small is crowded: many false positives, never a false negative.
        assert!((0..20_000).all(|i| !u.unseen(&format!("key-{i}"))));
    }

    #[test]
    fn most_keys_never_inserted_are_unseen_at_full_size() {
        let mut u = Unseen::new();
        for i in 0..100_000 {
            u.insert(&format!("key-{i}"));
        }
        let unseen = (0..100_000)
            .filter(|i| u.unseen(&format!("other-{i}")))
            .count();
        assert!(unseen >= 99_990, "only {unseen} of 100000 new keys unseen");
    }
}
