//! The ledger reader's writer: stores what the reader hands over on a thread of its own, so
//! the reader (one task, applying records in ledger order) need not wait for sled's inserts.
//!
//! It stores two things, a ledger message at a time ([`Batch`]):
//! - other pods' audit entries, in one value a message ([`Store::put_foreign_audits`]), keyed
//!   by their ledger position, so the order they are written in does not matter;
//! - while a pod restores a new store, the idempotency records of keys that store does not
//!   hold yet ([`super::apply::Applied::Restored`]): nothing reads them before the reader
//!   asks for a store read, and the reader then waits for the writer first
//!   ([`Writer::done`]). They are gathered into runs ([`super::run`]) and stored in key
//!   order, a run at a time, by a loader thread of their own (with one more thread for half
//!   of each run); while it stores one run, the reader fills the next.
//!
//! A failing store is waited out, as the reader does for its records: an entry dropped here
//! would never come back, since the offset would be saved past it. The reader's saved offset
//! waits for the writer ([`Writer::done`]), so a restart never skips one.

use super::record::Json;
use super::run::{Run, Sealed};
use crate::amqp::consumer::REQUEUE_PAUSE;
use crate::internal_events;
use crate::shutdown::Shutdown;
use crate::store::{AuditEntry, ForeignEntry, IdemRecord, Store, StoreError};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

/// Another pod's audit entry, to be stored under its ledger position (with the others of its
/// ledger message).
pub struct ForeignAudit {
    pub audit: Json<AuditEntry>,
    pub at_ms: u64,
    pub offset: u64,
    pub index: usize,
}

/// What one ledger message leaves to be stored.
#[derive(Default)]
pub struct Batch {
    /// Idempotency records of keys a new store does not hold yet, in ledger order.
    pub records: Vec<(String, Json<IdemRecord>)>,
    pub audits: Vec<ForeignAudit>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.audits.is_empty()
    }
}

enum Job {
    Store(Batch),
    /// A run of restored records; the permit is given back once it is stored.
    Load(Run, OwnedSemaphorePermit),
    /// Answered once every job sent before it is done.
    Barrier(oneshot::Sender<()>),
}

/// How often a record or entry that fails against a healthy store (not an I/O failure) is
/// tried before it is skipped (by the writer here, and by the reader for its own writes).
pub const APPLY_TRIES: u32 = 5;

/// Threads that store one run, each its own range of keys (the writer's and one more). One
/// where a spill is read by seeking (not unix: `super::run`).
const LOADERS: usize = if cfg!(unix) { 2 } else { 1 };

/// Batches (one per ledger message) that may wait for the writer.
const BACKLOG: usize = 64;

pub struct Writer {
    /// The writer thread: other pods' audit entries (and records that could not spill).
    jobs: mpsc::Sender<Job>,
    /// The loader thread: runs, so that the audit entries of the messages read meanwhile
    /// need not wait for a run to be stored.
    loads: mpsc::Sender<Job>,
    /// The run the reader is filling, and where runs spill.
    run: Mutex<Option<Run>>,
    spill_dir: PathBuf,
    store: Store,
    /// Cleared when a run cannot spill (the disk): records are then stored one by one.
    spilling: AtomicBool,
    /// One run at a time with the loader (queued or being stored), so at most two are in
    /// memory.
    loading: Arc<Semaphore>,
    /// Set when something was given up (shutdown came while the store failed): from then on
    /// the offset is not saved, so the next start reads that record again.
    lost: Arc<AtomicBool>,
    shutdown: Shutdown,
}

/// Start a thread that does the jobs sent to it, in order. Without a thread the channel is
/// closed, and the sender does its jobs in place.
fn spawn_thread(
    name: &str,
    store: &Store,
    shutdown: &Shutdown,
    lost: &Arc<AtomicBool>,
) -> mpsc::Sender<Job> {
    let (jobs, mut rx) = mpsc::channel(BACKLOG);
    let (store, shutdown, lost) = (store.clone(), shutdown.clone(), lost.clone());
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            while let Some(job) = rx.blocking_recv() {
                match job {
                    Job::Store(batch) => store_all(&store, &batch, &shutdown, &lost),
                    Job::Load(run, _permit) => load(&store, run, &shutdown, &lost),
                    Job::Barrier(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, thread = name, "cannot start a ledger writer thread; the reader stores what it applies itself");
    }
    jobs
}

/// Wait until every job sent to `jobs` before is done (at once if its thread is gone).
async fn barrier(jobs: &mpsc::Sender<Job>) {
    let (tx, rx) = oneshot::channel();
    if jobs.send(Job::Barrier(tx)).await.is_ok() {
        let _ = rx.await;
    }
}

impl Writer {
    /// Start the writer and loader threads; runs spill into the store's directory.
    pub fn start(store: Store, shutdown: Shutdown) -> Self {
        let dir = store.path().to_path_buf();
        Self::spilling_into(store, shutdown, dir)
    }

    fn spilling_into(store: Store, shutdown: Shutdown, spill_dir: PathBuf) -> Self {
        let lost = Arc::new(AtomicBool::new(false));
        Self {
            jobs: spawn_thread("ledger-writer", &store, &shutdown, &lost),
            loads: spawn_thread("ledger-loader", &store, &shutdown, &lost),
            run: Mutex::new(None),
            spill_dir,
            store,
            spilling: AtomicBool::new(true),
            loading: Arc::new(Semaphore::new(1)),
            lost,
            shutdown,
        }
    }

    /// Hand a message's batch to the writer (stored in place if it is gone). Its records go
    /// to the current run, which is handed over when full.
    pub async fn send(&self, mut batch: Batch) {
        if batch.is_empty() {
            return;
        }
        if !batch.records.is_empty() && self.spilling.load(Ordering::SeqCst) {
            let full = self.gather(&mut batch.records);
            if full {
                self.send_run().await;
            } else if !self.spilling.load(Ordering::SeqCst) {
                // The spill failed: the run so far is stored before the rest of the batch.
                self.send_run().await;
                barrier(&self.loads).await;
            }
            if batch.is_empty() {
                return;
            }
        }
        if let Err(mpsc::error::SendError(Job::Store(batch))) =
            self.jobs.send(Job::Store(batch)).await
        {
            store_all(&self.store, &batch, &self.shutdown, &self.lost);
        }
    }

    /// Add records to the current run (starting one if needed): true when it is full. What
    /// cannot spill stays in `records`, and runs stop for good.
    fn gather(&self, records: &mut Vec<(String, Json<IdemRecord>)>) -> bool {
        let Ok(mut current) = self.run.lock() else {
            return false;
        };
        if current.is_none() {
            match Run::create(&self.spill_dir) {
                Ok(run) => *current = Some(run),
                Err(e) => {
                    self.stop_spilling(&e);
                    return false;
                }
            }
        }
        let Some(run) = current.as_mut() else {
            return false;
        };
        let mut spilled = 0;
        for (key, record) in records.iter() {
            if let Err(e) = run.push(key, record.text()) {
                self.stop_spilling(&e);
                break;
            }
            spilled += 1;
        }
        records.drain(..spilled);
        run.is_full()
    }

    fn stop_spilling(&self, error: &std::io::Error) {
        internal_events::ledger_spill_failed(error, &self.spill_dir);
        self.spilling.store(false, Ordering::SeqCst);
    }

    /// Hand the current run to the loader (stored in place if it is gone), once the run before
    /// is stored.
    async fn send_run(&self) {
        let store = &self.store;
        let run = self.run.lock().ok().and_then(|mut r| r.take());
        let Some(run) = run.filter(|r| !r.is_empty()) else {
            return;
        };
        let Ok(permit) = self.loading.clone().acquire_owned().await else {
            return load(store, run, &self.shutdown, &self.lost);
        };
        if let Err(mpsc::error::SendError(Job::Load(run, _))) =
            self.loads.send(Job::Load(run, permit)).await
        {
            load(store, run, &self.shutdown, &self.lost);
        }
    }

    /// Resolves once every batch handed over before (and the current run) is stored or given
    /// up: true if nothing was ever given up.
    pub async fn done(&self) -> bool {
        self.send_run().await;
        barrier(&self.loads).await;
        barrier(&self.jobs).await;
        !self.lost.load(Ordering::SeqCst)
    }
}

fn store_all(store: &Store, batch: &Batch, shutdown: &Shutdown, lost: &AtomicBool) {
    let stored = batch.records.iter().all(|(key, record)| {
        persist(store, shutdown, record.text().len(), None, || {
            store.put_json(key, record.text())
        })
    }) && store_audits(store, &batch.audits, shutdown);
    if !stored {
        lost.store(true, Ordering::SeqCst);
    }
}

/// Store a run in key order, waiting out a failing store as [`persist`] does. A spill that
/// cannot be read back is tried [`APPLY_TRIES`] times; then the run is given up, and the
/// reader, finding that at its next [`Writer::done`], stops applying and holds its offset:
/// the pod stays not ready rather than serve with keys missing, and reads them again at its
/// next start.
fn load(store: &Store, run: Run, shutdown: &Shutdown, lost: &AtomicBool) {
    let (sealed, refused): (Sealed, _) = run.seal();
    if let Some(e) = refused {
        // What the file did not take is kept in memory with the run: nothing is lost.
        internal_events::ledger_spill_failed(&e, store.path());
    }
    let mut parts = sealed.parts(LOADERS).into_iter();
    let Some(first) = parts.next() else {
        return;
    };
    let sealed = &sealed;
    std::thread::scope(|scope| {
        for part in parts {
            let spawned = std::thread::Builder::new()
                .name("ledger-loader".into())
                .spawn_scoped(scope, {
                    let part = part.clone();
                    move || load_part(store, sealed, part, shutdown, lost)
                });
            if spawned.is_err() {
                load_part(store, sealed, part, shutdown, lost);
            }
        }
        load_part(store, sealed, first, shutdown, lost);
    });
}

/// Store one part of a run, as [`load`] says.
fn load_part(
    store: &Store,
    sealed: &Sealed,
    part: Range<usize>,
    shutdown: &Shutdown,
    lost: &AtomicBool,
) {
    let (mut from, mut failures) = (part.start, 0u32);
    loop {
        let stored = sealed.store(from..part.end, |key, value| {
            persist(store, shutdown, value.len(), None, || {
                store.put_json(key, value)
            })
        });
        match stored {
            Ok(at) => {
                if at < part.end {
                    // Shutdown came while the store failed.
                    lost.store(true, Ordering::SeqCst);
                }
                return;
            }
            Err((at, e)) => {
                internal_events::ledger_spill_failed(&e, store.path());
                failures += 1;
                if failures >= APPLY_TRIES || shutdown.is_requested() {
                    lost.store(true, Ordering::SeqCst);
                    return;
                }
                from = at;
                std::thread::sleep(REQUEUE_PAUSE);
            }
        }
    }
}

/// Store one ledger message's audit entries (one sled insert for most messages). An entry
/// that does not parse is skipped and counted. False if shutdown came first and the entries
/// are not stored.
fn store_audits(store: &Store, entries: &[ForeignAudit], shutdown: &Shutdown) -> bool {
    let Some(offset) = entries.first().map(|e| e.offset) else {
        return true;
    };
    let valid: Vec<ForeignEntry<'_>> = entries
        .iter()
        .filter(|e| {
            let parses = e.audit.parse().is_some();
            if !parses {
                internal_events::ledger_record_skipped(
                    i64::try_from(e.offset).ok(),
                    e.audit.text().len(),
                );
            }
            parses
        })
        .map(|e| ForeignEntry {
            at_ms: e.at_ms,
            index: e.index,
            json: e.audit.text(),
        })
        .collect();
    if valid.is_empty() {
        return true;
    }
    let len = valid.iter().map(|e| e.json.len()).sum();
    persist(store, shutdown, len, Some(offset), || {
        store.put_foreign_audits(offset, &valid)
    })
}

/// Run one write until it succeeds, waiting out a failing store. A write that fails against
/// a healthy store (not an I/O failure but this value against it) is tried
/// [`APPLY_TRIES`] times and then skipped and counted: waiting would stall the writer for
/// good. False if shutdown came while the store failed (nothing written).
fn persist(
    store: &Store,
    shutdown: &Shutdown,
    len: usize,
    offset: Option<u64>,
    mut write: impl FnMut() -> Result<(), StoreError>,
) -> bool {
    let mut other_errors = 0u32;
    loop {
        let Err(err) = write() else {
            return true;
        };
        internal_events::ledger_apply_failed(&err);
        if store.failure().is_none() {
            other_errors += 1;
            if other_errors >= APPLY_TRIES {
                internal_events::ledger_record_skipped(
                    offset.and_then(|o| i64::try_from(o).ok()),
                    len,
                );
                return true;
            }
        } else if shutdown.is_requested() {
            return false;
        }
        std::thread::sleep(REQUEUE_PAUSE);
    }
}

#[cfg(test)]
mod tests;
