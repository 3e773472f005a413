//! A run of a restoring pod's records, gathered in ledger order and stored in key order.
//!
//! A pod restoring a new store writes every completed key of the ledger once. Taken in ledger
//! order, real idempotency keys land all over sled's tree, and once the tree outgrows sled's
//! cache each insert reads its leaf back from disk: measured on sled alone, 17,500 inserts/s
//! for 1,000,000 scattered keys against 112,000/s for the same keys in order
//! (`docs/performance.md`). So the reader gathers a [`Run`]: the records' values appended to a
//! spill file beside the store, their keys and places in memory (at most
//! [`RUN_INDEX_BYTES`]); the ledger writer then inserts the run sorted by key. The first run
//! of a new store goes in at the tree's right edge, and a later run touches each leaf once
//! for several keys.
//!
//! The spill file is scratch: unlinked as soon as it is open (where the platform allows;
//! elsewhere when the run is dropped). A crash loses nothing the ledger does not hold: the
//! reader saves its offset only once everything before it is stored
//! (`super::writer::Writer::done`). A spill the disk refuses loses nothing either: what the
//! file did not take stays in memory with the run (the spill's write buffer, 64 KiB).

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
#[cfg(not(unix))]
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The memory a run's index may take (keys and places) before it is stored.
pub const RUN_INDEX_BYTES: usize = 16 << 20;

/// The spill a run may take on disk before it is stored (below 4 GiB: places are `u32`).
pub const RUN_SPILL_BYTES: u32 = 384 << 20;

/// One record's key (in the run's key arena) and value (in the spill file).
struct Entry {
    key_at: u32,
    key_len: u32,
    value_at: u32,
    value_len: u32,
}

const ENTRY_BYTES: usize = std::mem::size_of::<Entry>();

/// The records' keys, one after another, and each record's place.
struct Index {
    keys: Vec<u8>,
    entries: Vec<Entry>,
}

impl Index {
    fn key(&self, e: &Entry) -> &[u8] {
        let at = e.key_at as usize;
        &self.keys[at..at + e.key_len as usize]
    }
}

/// The spill file's path while it could not be unlinked at once: removed when the run goes.
struct Leftover(Option<PathBuf>);

impl Drop for Leftover {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

pub struct Run {
    spill: BufWriter<File>,
    spilled: u32,
    index: Index,
    _leftover: Leftover,
}

impl Run {
    /// A new, empty run spilling into a scratch file in `dir`.
    pub fn create(dir: &Path) -> io::Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = dir.join(format!(
            "ledger-restore-{}-{}.spill",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        let leftover = std::fs::remove_file(&path).err().map(|_| path);
        Ok(Self::on(file, Leftover(leftover)))
    }

    fn on(file: File, leftover: Leftover) -> Self {
        Self {
            spill: BufWriter::with_capacity(64 << 10, file),
            spilled: 0,
            index: Index {
                keys: Vec::new(),
                entries: Vec::new(),
            },
            _leftover: leftover,
        }
    }

    /// Add a record. Later records of the same key are stored after earlier ones.
    pub fn push(&mut self, key: &str, value: &str) -> io::Result<()> {
        let too_long = || io::Error::new(io::ErrorKind::InvalidInput, "record too long to spill");
        let key_len = u32::try_from(key.len()).map_err(|_| too_long())?;
        let value_len = u32::try_from(value.len()).map_err(|_| too_long())?;
        let key_at = u32::try_from(self.index.keys.len()).map_err(|_| too_long())?;
        let spilled = self.spilled.checked_add(value_len).ok_or_else(too_long)?;
        self.spill.write_all(value.as_bytes())?;
        self.index.keys.extend_from_slice(key.as_bytes());
        self.index.entries.push(Entry {
            key_at,
            key_len,
            value_at: self.spilled,
            value_len,
        });
        self.spilled = spilled;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.index.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.entries.is_empty()
    }

    /// Whether the run has reached its bounds and is to be stored now.
    pub fn is_full(&self) -> bool {
        self.index.keys.len() + self.index.entries.len() * ENTRY_BYTES >= RUN_INDEX_BYTES
            || self.spilled >= RUN_SPILL_BYTES
    }

    /// Put the run's records in key order (records of one key keep their order). Whatever
    /// the spill file did not take is kept in memory, so nothing is lost; the error that
    /// stopped it is handed back to be told.
    pub fn seal(self) -> (Sealed, Option<io::Error>) {
        let Run {
            mut spill,
            spilled,
            mut index,
            _leftover,
        } = self;
        let refused = spill.flush().err();
        let (file, unwritten) = spill.into_parts();
        let tail = unwritten.unwrap_or_else(|panicked| panicked.into_inner());
        let tail_at = spilled.saturating_sub(u32::try_from(tail.len()).unwrap_or(u32::MAX));
        let Index { keys, entries } = &mut index;
        let key = |e: &Entry| {
            let at = e.key_at as usize;
            &keys[at..at + e.key_len as usize]
        };
        entries.sort_by(|a, b| key(a).cmp(key(b)));
        let sealed = Sealed {
            file,
            tail,
            tail_at,
            index,
            _leftover,
        };
        (sealed, refused)
    }
}

/// Read a record's value: from the spill file up to `tail_at`, from `tail` (what the file
/// did not take) after it. Reads at an offset on unix, so threads may read one spill at
/// once; elsewhere a read seeks first, and only one thread may read a spill.
fn read_value(
    file: &File,
    tail: &[u8],
    tail_at: u32,
    e: &Entry,
    value: &mut Vec<u8>,
) -> io::Result<()> {
    let (start, len) = (e.value_at as usize, e.value_len as usize);
    let (end, file_end) = (start + len, tail_at as usize);
    value.resize(len, 0);
    if start < file_end {
        let from_file = &mut value[..end.min(file_end) - start];
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileExt;
            file.read_exact_at(from_file, u64::from(e.value_at))?;
        }
        #[cfg(not(unix))]
        {
            let mut file = file;
            file.seek(SeekFrom::Start(u64::from(e.value_at)))?;
            file.read_exact(from_file)?;
        }
    }
    if end > file_end {
        let from = start.max(file_end);
        let kept = tail.get(from - file_end..end - file_end).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "spilled record past its run")
        })?;
        value[from - start..].copy_from_slice(kept);
    }
    Ok(())
}

/// A run in key order, ready to store.
pub struct Sealed {
    file: File,
    /// What the spill file did not take (the disk refused it), from `tail_at` on.
    tail: Vec<u8>,
    tail_at: u32,
    index: Index,
    _leftover: Leftover,
}

impl Sealed {
    pub fn len(&self) -> usize {
        self.index.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.entries.is_empty()
    }

    /// The run cut into at most `n` ranges of about equal length, each to be stored on a
    /// thread of its own: sled takes inserts into different parts of its tree side by side.
    /// The records of one key stay in one range, in their order.
    pub fn parts(&self, n: usize) -> Vec<Range<usize>> {
        let len = self.len();
        let n = n.clamp(1, len.max(1));
        let mut parts = Vec::with_capacity(n);
        let mut start = 0;
        for i in 1..=n {
            let mut end = if i == n {
                len
            } else {
                (len * i / n).max(start)
            };
            while end > start && end < len && self.key(end) == self.key(end - 1) {
                end += 1;
            }
            if end > start {
                parts.push(start..end);
            }
            start = end;
        }
        parts
    }

    fn key(&self, i: usize) -> &[u8] {
        self.index.key(&self.index.entries[i])
    }

    /// Hand the records in `range` to `put` in key order, reading values back from the spill
    /// file. Returns where it stopped: the range's end, or the first record `put` refused
    /// (false); or the read error and where it came (to resume from).
    pub fn store(
        &self,
        range: Range<usize>,
        mut put: impl FnMut(&str, &str) -> bool,
    ) -> Result<usize, (usize, io::Error)> {
        let mut value = Vec::new();
        let end = range.end.min(self.len());
        for i in range.start..end {
            let e = &self.index.entries[i];
            if let Err(err) = read_value(&self.file, &self.tail, self.tail_at, e, &mut value) {
                return Err((i, err));
            }
            let (Ok(key), Ok(value)) = (
                std::str::from_utf8(self.key(i)),
                std::str::from_utf8(&value),
            ) else {
                let err = io::Error::new(io::ErrorKind::InvalidData, "spilled record is not UTF-8");
                return Err((i, err));
            };
            if !put(key, value) {
                return Ok(i);
            }
        }
        Ok(end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_gives_its_records_back_in_key_order_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut run = Run::create(dir.path()).unwrap();
        for (k, v) in [("c", "3"), ("a", "1"), ("b", "2"), ("a", "1-again")] {
            run.push(k, v).unwrap();
        }
        assert_eq!(run.len(), 4);
        assert!(!run.is_full());
        let sealed = run.seal().0;
        let mut seen = Vec::new();
        let put = sealed.store(0..sealed.len(), |k, v| {
            seen.push(format!("{k}={v}"));
            true
        });
        assert_eq!(put.ok(), Some(4));
        // One key's records keep their ledger order: the later one is stored last.
        assert_eq!(seen, ["a=1", "a=1-again", "b=2", "c=3"]);
        drop(sealed);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn storing_stops_where_put_says_and_resumes_there() {
        let dir = tempfile::tempdir().unwrap();
        let mut run = Run::create(dir.path()).unwrap();
        for i in (0..10).rev() {
            run.push(&format!("k{i}"), &format!("v{i}")).unwrap();
        }
        let sealed = run.seal().0;
        let mut seen = Vec::new();
        let stopped = sealed.store(0..10, |k, _| {
            seen.push(k.to_string());
            seen.len() < 4
        });
        assert_eq!(stopped.ok(), Some(3), "the fourth was not put");
        let rest = sealed.store(3..10, |k, _| {
            seen.push(k.to_string());
            true
        });
        assert_eq!(rest.ok(), Some(10));
        let expected: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
        assert_eq!(seen[..3], expected[..3]);
        assert_eq!(seen[4..], expected[3..]);
    }

    #[test]
    fn parts_cover_the_run_and_keep_a_key_in_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut run = Run::create(dir.path()).unwrap();
        // Keys a, b, b, b, b, c, d, e (b four times).
        for k in ["e", "b", "a", "b", "c", "b", "d", "b"] {
            run.push(k, "v").unwrap();
        }
        let sealed = run.seal().0;
        let parts = sealed.parts(4);
        let flat: Vec<usize> = parts.iter().flat_map(|r| r.clone()).collect();
        assert_eq!(
            flat,
            (0..8).collect::<Vec<_>>(),
            "every record once, in order"
        );
        for r in &parts {
            let keys: Vec<&[u8]> = r.clone().map(|i| sealed.key(i)).collect();
            for other in parts.iter().filter(|o| *o != r) {
                assert!(
                    other.clone().all(|i| !keys.contains(&sealed.key(i))),
                    "a key in two parts: {parts:?}"
                );
            }
        }
        assert_eq!(sealed.parts(1), vec![0..8]);
        assert_eq!(
            sealed.parts(100).len(),
            5,
            "one part a distinct key at most"
        );
    }

    #[test]
    fn what_the_disk_refuses_stays_with_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("read-only.spill");
        std::fs::write(&path, b"").unwrap();
        // Opened for reading only: every write to the file fails, as on a full disk.
        let file = File::open(&path).unwrap();
        let mut run = Run::on(file, Leftover(None));
        for i in (0..50).rev() {
            run.push(&format!("k{i:02}"), &format!("value-{i}"))
                .unwrap();
        }
        let (sealed, refused) = run.seal();
        assert!(refused.is_some(), "the flush was refused");
        let mut seen = Vec::new();
        let put = sealed.store(0..sealed.len(), |k, v| {
            seen.push(format!("{k}={v}"));
            true
        });
        assert_eq!(put.ok(), Some(50));
        let expected: Vec<String> = (0..50).map(|i| format!("k{i:02}=value-{i}")).collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn a_value_is_read_across_the_file_and_what_it_did_not_take() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("part.spill");
        std::fs::write(&path, b"hello").unwrap();
        let file = File::open(&path).unwrap();
        let entry = |value_at, value_len| Entry {
            key_at: 0,
            key_len: 0,
            value_at,
            value_len,
        };
        let mut value = Vec::new();
        read_value(&file, b"world", 5, &entry(3, 5), &mut value).unwrap();
        assert_eq!(value, b"lowor");
        read_value(&file, b"world", 5, &entry(6, 4), &mut value).unwrap();
        assert_eq!(value, b"orld");
        read_value(&file, b"world", 5, &entry(0, 4), &mut value).unwrap();
        assert_eq!(value, b"hell");
        assert!(
            read_value(&file, b"world", 5, &entry(8, 4), &mut value).is_err(),
            "past the run: an error, not a panic"
        );
    }

    #[test]
    fn a_run_is_full_at_its_index_bound() {
        let dir = tempfile::tempdir().unwrap();
        let mut run = Run::create(dir.path()).unwrap();
        let key = "k".repeat(1000);
        let mut pushed = 0;
        while !run.is_full() {
            run.push(&key, "v").unwrap();
            pushed += 1;
        }
        assert_eq!(pushed, RUN_INDEX_BYTES.div_ceil(1000 + ENTRY_BYTES));
    }
}
