//! The sled store: idempotency records and the append-only audit trail.
//!
//! Writes go to sled's in-memory log at once; [`Store::durable`] waits until they are on disk.
//! A single flusher task group-commits: every caller waiting while a flush runs is served by the
//! next one, and flushes start at most once per [`MIN_FLUSH_INTERVAL`], so the fsync rate stays
//! flat while throughput grows. Nothing is acked by the worker
//! before `durable` returns.
//!
//! sled allows one process per directory; a second opener gets [`StoreError::Locked`].
//!
//! - [`idempotency`]: the per-key records and the claim rule.
//! - [`audit`]: the append-only audit trail and its queries.
//! - [`fleet`]: what this pod keeps of the fleet ledger: the last offset applied and a snapshot
//!   of the live claims.
//!
//! The store knows nothing of the broker, the Genesys client or the pipelines that use it.

pub mod audit;
pub mod fleet;
mod heal;
pub use heal::HEAL_EVERY;
pub mod idempotency;

pub use audit::{AuditEntry, AuditQuery, ForeignEntry};
pub use fleet::{ClaimsSnapshot, FleetClaim};
pub use idempotency::{Claim, IdemRecord, IdemState};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};

const IDEMPOTENCY_TREE: &str = "idempotency";
const AUDIT_TREE: &str = "audit";
/// sled page cache; bounds the worker's memory with a large backlog.
const CACHE_BYTES: u64 = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path} is in use by another process (sled allows one process per store); stop it, or use its HTTP endpoint")]
    Locked { path: PathBuf },
    #[error("cannot open store {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("store I/O error: {0}")]
    Io(String),
    #[error("the record under key {key:?} kept changing while this pod claimed it; the delivery is tried again")]
    Contended { key: String },
    #[error("corrupt record under key {key:?} ({message}); the store is damaged: stop the worker, move store.path aside, and start it on an empty store (it restores the completed keys from the fleet ledger before it consumes)")]
    Corrupt { key: String, message: String },
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

type FlushWaiter = oneshot::Sender<Result<(), String>>;

/// The open sled database and its trees. Replaced as a whole when a failing store is reopened.
struct Trees {
    db: sled::Db,
    idem: sled::Tree,
    audit: sled::Tree,
    claims: sled::Tree,
    meta: sled::Tree,
}

struct Shared {
    path: PathBuf,
    /// `None` only while a failing store is being reopened.
    trees: RwLock<Option<Arc<Trees>>>,
    idempotency_ttl: Duration,
    flush_tx: Option<mpsc::UnboundedSender<FlushWaiter>>,
    /// Group commits made by this store's flusher.
    flushes: AtomicU64,
    /// Bumped each time the database is reopened.
    generation: AtomicU64,
    /// Why writes fail, while they do (SPEC §5: disk full, I/O error).
    failure: watch::Sender<Option<String>>,
}

/// The store. Cheap to clone; every clone is the same store.
///
/// Once a write or flush fails, sled refuses every later write until the database is opened
/// again (freeing disk space alone does not help). So a failure is remembered here
/// ([`Store::failure`]), and a healer task probes the store every [`heal::HEAL_EVERY`], reopening it
/// until a write and flush succeed; then the failure clears. Callers wait for that with
/// [`Store::writable`].
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn open_trees(path: &Path) -> Result<Trees, StoreError> {
    if let Err(e) = std::fs::create_dir_all(path) {
        return Err(StoreError::Open {
            path: path.to_path_buf(),
            message: e.to_string(),
        });
    }
    let db = sled::Config::new()
        .path(path)
        // sled caches up to 1 GiB by default; the working set here is the recent keys.
        .cache_capacity(CACHE_BYTES)
        .flush_every_ms(Some(1000))
        .open()
        .map_err(|e| match &e {
            sled::Error::Io(io)
                if io.kind() == std::io::ErrorKind::WouldBlock
                    || io.to_string().contains("could not acquire lock") =>
            {
                StoreError::Locked {
                    path: path.to_path_buf(),
                }
            }
            _ => StoreError::Open {
                path: path.to_path_buf(),
                message: e.to_string(),
            },
        })?;
    Ok(Trees {
        idem: db.open_tree(IDEMPOTENCY_TREE)?,
        audit: db.open_tree(AUDIT_TREE)?,
        claims: db.open_tree(fleet::CLAIMS_TREE)?,
        meta: db.open_tree(fleet::META_TREE)?,
        db,
    })
}

impl Store {
    /// The store's directory.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Open (creating if needed). Inside a tokio runtime this starts the group-commit flusher
    /// and the healer.
    pub fn open(path: &Path, idempotency_ttl: Duration) -> Result<Self, StoreError> {
        let trees = open_trees(path)?;
        let runtime = tokio::runtime::Handle::try_current().ok();
        let (flush_tx, flush_rx) = match runtime {
            Some(_) => {
                let (tx, rx) = mpsc::unbounded_channel();
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let (failure, failures) = watch::channel(None);
        let store = Self {
            shared: Arc::new(Shared {
                path: path.to_path_buf(),
                trees: RwLock::new(Some(Arc::new(trees))),
                idempotency_ttl,
                flush_tx,
                flushes: AtomicU64::new(0),
                generation: AtomicU64::new(0),
                failure,
            }),
        };
        if let (Some(handle), Some(rx)) = (runtime, flush_rx) {
            let weak = Arc::downgrade(&store.shared);
            handle.spawn(flusher(weak.clone(), rx));
            handle.spawn(heal::healer(weak, failures));
        }
        Ok(store)
    }

    fn trees(&self) -> Result<Arc<Trees>, StoreError> {
        self.shared
            .trees
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| StoreError::Io("the store is being reopened after a failure".into()))
    }

    /// Fail as a store on a full disk does: every write errors until the healer (if the store
    /// was opened inside a runtime) reopens it.
    #[cfg(test)]
    pub(crate) fn fail_for_test(&self) {
        self.shared
            .trees
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.failed(&StoreError::Io("failing for a test".into()));
    }

    /// Run a write; an I/O failure marks the store failing.
    fn write<T>(&self, f: impl FnOnce(&Trees) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let result = self.trees().and_then(|t| f(&t));
        if let Err(e) = &result {
            self.failed(e);
        }
        result
    }

    /// Remember that writes fail (logged and counted once per failure, not per write).
    fn failed(&self, e: &StoreError) {
        if !matches!(e, StoreError::Io(_)) {
            return;
        }
        let message = e.to_string();
        let began = self.shared.failure.send_if_modified(|f| {
            if f.is_none() {
                *f = Some(message.clone());
                true
            } else {
                false
            }
        });
        if began {
            crate::internal_events::store_failed(&message);
        }
    }

    /// Changes each time a failing store is reopened. Writes made before a reopen and not yet
    /// durable are gone with the old database: a writer that sees the generation change
    /// between its first write and `durable` writes again.
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::SeqCst)
    }

    /// Why writes fail, while they do.
    pub fn failure(&self) -> Option<String> {
        self.shared.failure.borrow().clone()
    }

    /// Follow the failure state (`Some(why)` while writes fail).
    pub fn failures(&self) -> watch::Receiver<Option<String>> {
        self.shared.failure.subscribe()
    }

    /// Wait until the store takes writes (at once if it does). False if `shutdown` came first.
    pub async fn writable(&self, shutdown: &mut crate::shutdown::Shutdown) -> bool {
        let mut rx = self.failures();
        tokio::select! {
            r = rx.wait_for(Option::is_none) => r.is_ok(),
            _ = shutdown.requested() => false,
        }
    }

    /// Wait until every write made before this call is on disk (group commit).
    pub async fn durable(&self) -> Result<(), StoreError> {
        if let Some(tx) = &self.shared.flush_tx {
            let (done_tx, done_rx) = oneshot::channel();
            if tx.send(done_tx).is_ok() {
                let result = match done_rx.await {
                    Ok(result) => result.map_err(StoreError::Io),
                    Err(_) => Err(StoreError::Io("store flusher stopped".into())),
                };
                if let Err(e) = &result {
                    self.failed(e);
                }
                return result;
            }
        }
        self.flush_now()
    }

    /// Group commits made so far by this store's flusher.
    pub fn group_commits(&self) -> u64 {
        self.shared.flushes.load(Ordering::Relaxed)
    }

    /// Flush synchronously (shutdown, tools).
    pub fn flush_now(&self) -> Result<(), StoreError> {
        self.write(|t| Ok(t.db.flush().map(drop)?))
    }

    /// Remove idempotency records idle longer than the TTL and audit entries older than
    /// `audit_retention`. Returns (records removed, audit entries removed).
    pub fn prune(&self, audit_retention: Duration) -> Result<(usize, usize), StoreError> {
        let now = now_ms();
        let ttl_ms = self.shared.idempotency_ttl.as_millis() as u64;
        let t = self.trees()?;
        let mut records = 0;
        for item in t.idem.iter() {
            let (k, v) = item?;
            let expired = match serde_json::from_slice::<IdemRecord>(&v) {
                Ok(r) => r.updated_at_ms.saturating_add(ttl_ms) < now,
                Err(_) => true,
            };
            if expired {
                t.idem.remove(k)?;
                records += 1;
            }
        }
        let cutoff_us = now
            .saturating_mul(1000)
            .saturating_sub(audit_retention.as_micros() as u64);
        let mut entries = 0;
        for item in t.audit.range(..cutoff_us.to_be_bytes()) {
            let (k, _) = item?;
            t.audit.remove(k)?;
            entries += 1;
        }
        Ok((records, entries))
    }
}

/// Group commits start at most this often. Under load each one then covers more writers
/// (a sled flush wakes its whole I/O thread pool, so flushes cost far more CPU than writes);
/// an idle store flushes at once.
pub const MIN_FLUSH_INTERVAL: Duration = Duration::from_millis(1);

async fn flusher(shared: Weak<Shared>, mut rx: mpsc::UnboundedReceiver<FlushWaiter>) {
    let mut last_start: Option<tokio::time::Instant> = None;
    while let Some(first) = rx.recv().await {
        if let Some(next) = last_start.map(|t| t + MIN_FLUSH_INTERVAL) {
            if tokio::time::Instant::now() < next {
                tokio::time::sleep_until(next).await;
            }
        }
        last_start = Some(tokio::time::Instant::now());
        let mut waiters = vec![first];
        while let Ok(w) = rx.try_recv() {
            waiters.push(w);
        }
        let m = crate::metrics::metrics();
        m.store_flushes.inc();
        m.store_flush_waiters.observe(waiters.len() as f64);
        // The database is looked up for each flush (and not held between them), so a failing
        // store can be reopened.
        let db = shared.upgrade().and_then(|s| {
            s.flushes.fetch_add(1, Ordering::Relaxed);
            Store { shared: s }.trees().ok().map(|t| t.db.clone())
        });
        let result = match db {
            Some(db) => tokio::task::spawn_blocking(move || db.flush().map(drop))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string())),
            None => Err("the store is being reopened after a failure".into()),
        };
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests;
