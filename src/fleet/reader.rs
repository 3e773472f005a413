//! The ledger reader: consumes the ledger stream in order (concurrency 1), applies each record
//! to the live claims ([`Claims`], in memory) and the store with the one rule of
//! [`super::apply`], remembers the offset, and hands claim decisions to the tasks waiting for
//! them. On each (re)connect it appends a mark and reports caught up once it reads that mark
//! back. It saves the claims every few seconds and when it stops; a restart loads them and
//! reads on from their offset, applying to the claims alone what the store already holds.

use super::apply::{apply, Applied, Known};
use super::claims::{Claims, SNAPSHOT_EVERY};
use super::record::Json;
use super::record::{OutcomeRecord, Record, RECORD_TYPE};
use super::unseen::Unseen;
use super::Fleet;
use crate::amqp::consumer::{Settle, REQUEUE_PAUSE};
use crate::amqp::shell::{self, Pipeline, SharedConnection, ShellOptions};
use crate::amqp::{self, header_i64, topology, AmqpError};
use crate::metrics::metrics;
use crate::shutdown::Shutdown;
use crate::store::{AuditEntry, Store};
use crate::{alloc, internal_events};
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// How often a record that fails against a healthy store (not an I/O failure) is tried before
/// it is skipped.
const APPLY_TRIES: u32 = 5;

/// Stream deliveries the broker may push ahead of the reader (a stream consumer needs one).
const PREFETCH: u16 = 200;

/// Records applied before the first catch-up after which the reader takes the allocator's
/// fast phase ([`alloc::Fast`]): a restore, not a pod that was down a moment.
pub const FAST_AFTER: u64 = 10_000;

struct Reader {
    fleet: Arc<Fleet>,
    /// The store's ledger offset at start: records up to it are already in the store.
    stored: Option<u64>,
    saved_at: Mutex<Instant>,
    /// The mark appended on this connection.
    mark: Mutex<Option<String>>,
    /// Set when shutdown came while a record waited for a failing store: nothing after it is
    /// applied or remembered, so the next start resumes at that record.
    stopped: AtomicBool,
    shutdown: Shutdown,
    audits: AuditWriter,
    /// While a pod that started on a new store catches up: the keys the reader has stored,
    /// so it need not read the store for the others. Dropped once caught up.
    unseen: Mutex<Option<Unseen>>,
    /// Until the first catch-up: the records applied, and past [`FAST_AFTER`] the allocator's
    /// fast phase, ended at the catch-up or when the reader stops.
    first_catch_up: FirstCatchUp,
}

#[derive(Default)]
struct FirstCatchUp {
    over: AtomicBool,
    applied: AtomicU64,
    fast: Mutex<Option<alloc::Fast>>,
}

impl FirstCatchUp {
    fn applied(&self) {
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

    fn end(&self) {
        self.over.store(true, Ordering::Relaxed);
        self.fast().take();
    }

    fn fast(&self) -> MutexGuard<'_, Option<alloc::Fast>> {
        self.fast.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Another pod's audit entry, to be stored under its ledger position.
struct ForeignAudit {
    audit: Json<AuditEntry>,
    at_ms: u64,
    offset: u64,
    index: usize,
}

enum AuditJob {
    Store(Vec<ForeignAudit>),
    /// Answered once every job sent before it is done.
    Barrier(oneshot::Sender<()>),
}

/// Stores other pods' audit entries on a thread of its own, beside the reader: each is keyed
/// by its ledger position, so the order they are written in does not matter, and the reader
/// (one thread, applying records in ledger order) need not wait for their inserts, a quarter
/// of its work when a new pod restores. The reader's saved offset waits for them
/// ([`AuditWriter::done`]), so a restart never skips one.
struct AuditWriter {
    jobs: mpsc::Sender<AuditJob>,
    /// Set when an entry was given up (shutdown came while the store failed): from then on
    /// the offset is not saved, so the next start reads that entry's record again.
    lost: Arc<AtomicBool>,
    shutdown: Shutdown,
}

/// Audit batches (one per ledger message) that may wait for the writer.
const AUDIT_BACKLOG: usize = 64;

impl AuditWriter {
    fn start(store: Store, shutdown: Shutdown) -> Self {
        let (jobs, mut rx) = mpsc::channel(AUDIT_BACKLOG);
        let lost = Arc::new(AtomicBool::new(false));
        let (thread_lost, thread_shutdown) = (lost.clone(), shutdown.clone());
        let spawned = std::thread::Builder::new()
            .name("ledger-audit".into())
            .spawn(move || {
                while let Some(job) = rx.blocking_recv() {
                    match job {
                        AuditJob::Store(entries) => {
                            store_all(&store, &entries, &thread_shutdown, &thread_lost)
                        }
                        AuditJob::Barrier(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            // No thread: the jobs channel is closed, and `send` stores in place instead.
            tracing::warn!(error = %e, "cannot start the ledger audit thread; the reader stores audit entries itself");
        }
        Self {
            jobs,
            lost,
            shutdown,
        }
    }

    /// Hand a message's entries to the writer (in place if it is gone).
    async fn send(&self, store: &Store, entries: Vec<ForeignAudit>) {
        if let Err(mpsc::error::SendError(AuditJob::Store(entries))) =
            self.jobs.send(AuditJob::Store(entries)).await
        {
            store_all(store, &entries, &self.shutdown, &self.lost);
        }
    }

    /// Resolves once every entry handed over before is stored or given up: true if none was
    /// ever given up.
    async fn done(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.jobs.send(AuditJob::Barrier(tx)).await.is_ok() {
            let _ = rx.await;
        }
        !self.lost.load(Ordering::SeqCst)
    }
}

fn store_all(store: &Store, entries: &[ForeignAudit], shutdown: &Shutdown, lost: &AtomicBool) {
    for e in entries {
        if !store_one(store, e, shutdown) {
            lost.store(true, Ordering::SeqCst);
        }
    }
}

/// Store one entry, waiting out a failing store as the reader does for its records (an
/// entry dropped here would never come back: the offset would be saved past it). False if
/// shutdown came first and the entry is not stored.
fn store_one(store: &Store, e: &ForeignAudit, shutdown: &Shutdown) -> bool {
    let offset = i64::try_from(e.offset).ok();
    if e.audit.parse().is_none() {
        internal_events::ledger_record_skipped(offset, e.audit.text().len());
        return true;
    }
    let mut other_errors = 0u32;
    loop {
        let Err(err) = store.put_foreign_audit(e.audit.text(), e.at_ms, e.offset, e.index) else {
            return true;
        };
        internal_events::ledger_apply_failed(&err);
        if store.failure().is_none() {
            // Not the store failing but this entry against it: waiting would stall the
            // writer for good.
            other_errors += 1;
            if other_errors >= APPLY_TRIES {
                internal_events::ledger_record_skipped(offset, e.audit.text().len());
                return true;
            }
        } else if shutdown.is_requested() {
            return false;
        }
        std::thread::sleep(REQUEUE_PAUSE);
    }
}

pub async fn run(
    fleet: Arc<Fleet>,
    shutdown: Shutdown,
    link: Option<Arc<SharedConnection>>,
) -> Result<(), AmqpError> {
    let s = fleet.settings.clone();
    let opts = ShellOptions {
        name: format!("session-worker ledger {}", fleet.worker_id),
        queue: s.amqp.ledger_stream.clone(),
        tag_prefix: format!("{}-ledger", fleet.worker_id),
        prefetch: PREFETCH,
        concurrency: 1,
        grace: s.worker.shutdown_grace,
        link,
    };
    let health = fleet.health.clone();
    let claims = Claims::load_or_rebuild(&fleet.store);
    let stored = fleet.store.ledger_offset().ok().flatten();
    tracing::info!(
        claims = claims.len(),
        from_offset = claims.offset(),
        store_offset = stored,
        "fleet claims loaded"
    );
    *fleet.claims_lock() = claims;
    let audits = AuditWriter::start(fleet.store.clone(), shutdown.clone());
    // Until caught up, the reader is the only writer of idempotency records and outcomes'
    // audit entries (the worker takes no delivery before), so on a new store it knows which
    // keys are there.
    let unseen = match fleet.store.is_new() {
        Ok(true) => Some(Unseen::new()),
        _ => None,
    };
    let reader = Arc::new(Reader {
        audits,
        fleet,
        stored,
        saved_at: Mutex::new(Instant::now()),
        mark: Mutex::new(None),
        stopped: AtomicBool::new(false),
        shutdown: shutdown.clone(),
        unseen: Mutex::new(unseen),
        first_catch_up: FirstCatchUp::default(),
    });
    let result = shell::run(&s.amqp, &opts, reader.clone(), &health, shutdown).await;
    reader.first_catch_up.end();
    reader.save_claims().await;
    result
}

impl Reader {
    async fn apply(&self, delivery: &Delivery) {
        if self.stopped.load(Ordering::SeqCst) {
            return;
        }
        let offset = header_i64(&delivery.properties, "x-stream-offset");
        let Some(records) = Record::decode_message(&delivery.data) else {
            internal_events::ledger_record_skipped(offset, delivery.data.len());
            self.remember(offset).await;
            return;
        };
        let mut audits = Vec::new();
        for (index, record) in records.into_iter().enumerate() {
            match record {
                Some(record) => {
                    if !self.apply_one(&record, offset, index, &mut audits).await {
                        return;
                    }
                }
                None => internal_events::ledger_record_skipped(offset, delivery.data.len()),
            }
        }
        if !audits.is_empty() {
            self.audits.send(&self.fleet.store, audits).await;
        }
        self.remember(offset).await;
    }

    /// Apply one record, waiting out a failing store: a record is never skipped for the
    /// store's sake (that would let this pod decide claims on a view missing an outcome).
    /// False if shutdown came first; the reader then stops applying.
    async fn apply_one(
        &self,
        record: &Record,
        offset: Option<i64>,
        index: usize,
        audits: &mut Vec<ForeignAudit>,
    ) -> bool {
        let fleet = &self.fleet;
        let position = offset.and_then(|o| u64::try_from(o).ok());
        let replay = match (position, self.stored) {
            (Some(o), Some(stored)) => o <= stored,
            _ => false,
        };
        let known = if replay {
            Known::Applied
        } else {
            self.known(record)
        };
        let mut other_errors = 0u32;
        let applied = loop {
            let result = apply(
                &fleet.store,
                &mut self.claims(),
                record,
                &fleet.worker_id,
                known,
            );
            match result {
                Ok(a) => break a,
                Err(e) => {
                    internal_events::ledger_apply_failed(&e);
                    if fleet.store.failure().is_none() {
                        // Not the store failing but this record against it (a damaged
                        // record under its key): waiting would stall the reader for good.
                        other_errors += 1;
                        if other_errors >= APPLY_TRIES {
                            internal_events::ledger_record_skipped(offset, 0);
                            return true;
                        }
                        tokio::time::sleep(REQUEUE_PAUSE).await;
                        continue;
                    }
                    let mut shutdown = self.shutdown.clone();
                    let healed = tokio::select! {
                        _ = tokio::time::sleep(REQUEUE_PAUSE) => {
                            fleet.store.writable(&mut shutdown).await
                        }
                        _ = shutdown.requested() => false,
                    };
                    if !healed {
                        tracing::warn!(offset, "shutdown while the store fails: the ledger reader stops here and resumes at this record");
                        self.stopped.store(true, Ordering::SeqCst);
                        return false;
                    }
                }
            }
        };
        metrics().ledger_applied.inc();
        self.first_catch_up.applied();
        if let Record::Outcome(OutcomeRecord { key, .. }) = record {
            if let Some(unseen) = self.unseen().as_mut() {
                unseen.insert(key);
            }
        }
        if let Record::Outcome(OutcomeRecord { key, .. }) | Record::Forget { key } = record {
            // After the store write: a claim of this pod's made on the key from its `intend`
            // on either saw that write or is no longer open (`Known::Open`).
            fleet.touched(key);
        }
        match applied {
            Applied::Claim { claim_id, decision } => {
                if let Record::Claim { key, .. } = record {
                    fleet.decided(key, &claim_id, decision);
                }
            }
            Applied::Mark { id } => {
                let mine = self
                    .mark
                    .lock()
                    .map(|m| m.as_deref() == Some(id.as_str()))
                    .unwrap_or(false);
                if mine {
                    // The worker writes the store from now on.
                    self.unseen().take();
                    self.first_catch_up.end();
                    tracing::info!(offset, "fleet ledger caught up");
                    fleet.set_caught_up(true);
                }
            }
            Applied::Foreign { audit, at_ms } => match position {
                Some(offset) => audits.push(ForeignAudit {
                    audit,
                    at_ms,
                    offset,
                    index,
                }),
                None => match audit.parse() {
                    Some(entry) => {
                        if let Err(e) = fleet.store.append_audit(&entry) {
                            internal_events::ledger_apply_failed(&e);
                        }
                    }
                    None => internal_events::ledger_record_skipped(offset, audit.text().len()),
                },
            },
            Applied::Stranger => internal_events::ledger_record_skipped(offset, 0),
            Applied::Other => {}
        }
        true
    }

    /// What this pod knows of its store for a record it has not applied before, without
    /// reading the store: its own open claims, its own stored outcomes and, while a pod
    /// restores a new store, the keys it has not stored yet need no read. Asked once per
    /// record (it takes the outcome's note).
    fn known(&self, record: &Record) -> Known {
        let fleet = &self.fleet;
        let known = match record {
            Record::Claim {
                key,
                claim_id,
                worker_id,
                ..
            } if *worker_id == fleet.worker_id && fleet.open(key, claim_id) => Known::Open,
            Record::Outcome(OutcomeRecord { key, head, .. })
                if head.worker_id == fleet.worker_id
                    && fleet.take_told(key, head.updated_at_ms) =>
            {
                Known::Applied
            }
            _ => Known::Nothing,
        };
        match (known, record) {
            (
                Known::Nothing,
                Record::Claim { key, .. }
                | Record::Outcome(OutcomeRecord { key, .. })
                | Record::Forget { key },
            ) if self.unseen().as_ref().is_some_and(|u| u.unseen(key)) => Known::Absent,
            _ => known,
        }
    }

    fn unseen(&self) -> MutexGuard<'_, Option<Unseen>> {
        self.unseen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The message at `offset` is applied: note it in the claims, and now and then save the
    /// claims and the offset. Not a store write per message: what a restart reads again
    /// (at most [`SNAPSHOT_EVERY`] of the ledger) applies to the store again idempotently.
    async fn remember(&self, offset: Option<i64>) {
        let Some(o) = offset.and_then(|o| u64::try_from(o).ok()) else {
            return;
        };
        self.claims().set_offset(o);
        let due = self
            .saved_at
            .lock()
            .map(|at| at.elapsed() >= SNAPSHOT_EVERY)
            .unwrap_or(true);
        if due {
            self.save_claims().await;
        }
    }

    /// Prune lapsed claims and save the rest with their offset, and note that offset as the
    /// store's (unless the store was further on already). First every audit entry of the
    /// records up to that offset is stored.
    async fn save_claims(&self) {
        if !self.audits.done().await {
            // Shutdown came while the store failed and an entry of a record before this
            // offset was not stored: the next start must read that record again.
            internal_events::ledger_offset_held();
            return;
        }
        let ttl = self.fleet.settings.store.idempotency_ttl;
        let mut claims = self.claims();
        claims.prune(crate::store::now_ms(), ttl);
        if let Err(e) = claims.save(&self.fleet.store) {
            internal_events::ledger_apply_failed(&e);
        }
        if let Some(o) = claims.offset() {
            if self.stored.is_none_or(|stored| o > stored) {
                if let Err(e) = self.fleet.store.set_ledger_offset(o) {
                    internal_events::ledger_apply_failed(&e);
                }
            }
        }
        drop(claims);
        if let Ok(mut at) = self.saved_at.lock() {
            *at = Instant::now();
        }
    }

    /// The live claims (the fleet's, so the worker can ask them) and the offset they reflect.
    fn claims(&self) -> MutexGuard<'_, Claims> {
        self.fleet.claims_lock()
    }
}

impl Pipeline for Reader {
    const NAME: &'static str = "ledger";
    const IN_ORDER: bool = true;
    type Error = Infallible;

    fn span(&self, delivery: &Delivery) -> tracing::Span {
        tracing::debug_span!("ledger", delivery_tag = delivery.delivery_tag)
    }

    async fn handle(
        self: Arc<Self>,
        delivery: Delivery,
        _publish: Channel,
    ) -> Result<Settle, Infallible> {
        self.apply(&delivery).await;
        Ok(Settle::Ack)
    }

    fn arguments(&self) -> FieldTable {
        // On from where the claims are (the store's own offset may lie further on: what lies
        // between is applied to the claims alone).
        let start = match self.claims().offset() {
            Some(o) => {
                AMQPValue::LongLongInt(i64::try_from(o.saturating_add(1)).unwrap_or(i64::MAX))
            }
            None => AMQPValue::LongString("first".into()),
        };
        amqp::table(vec![("x-stream-offset", start)])
    }

    async fn connected(&self, conn: &Connection, publish: &Channel) -> Result<(), AmqpError> {
        let s = &self.fleet.settings;
        topology::declare_ledger(conn, &s.amqp, s.store.idempotency_ttl).await?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        if let Ok(mut m) = self.mark.lock() {
            *m = Some(id.clone());
        }
        let mark = Record::Mark {
            id,
            worker_id: self.fleet.worker_id.clone(),
        };
        let props = amqp::json_properties().with_type(RECORD_TYPE.into());
        amqp::publish_routed(publish, "", &s.amqp.ledger_stream, &mark.encode(), props).await
    }

    fn disconnected(&self) {
        self.fleet.set_caught_up(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entries(offset: u64, n: usize) -> Vec<ForeignAudit> {
        (0..n)
            .map(|index| ForeignAudit {
                audit: Json::new(&AuditEntry {
                    idempotency_key: Some(format!("k{offset}-{index}")),
                    outcome: "started".into(),
                    ..Default::default()
                }),
                at_ms: crate::store::now_ms(),
                offset,
                index,
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_entry_met_by_a_failing_store_is_stored_once_the_store_heals() {
        let dir = tempfile::tempdir().unwrap();
        // Opened in the runtime: the healer reopens it after a failure.
        let store = Store::open(dir.path(), Duration::from_secs(3600)).unwrap();
        let writer = AuditWriter::start(store.clone(), Shutdown::never());
        store.fail_for_test();
        writer.send(&store, entries(1, 5)).await;
        assert!(writer.done().await, "nothing was given up");
        assert!(
            store.failure().is_none(),
            "done waited for the store to heal"
        );
        assert_eq!(store.audit_all().count(), 5);
    }

    #[test]
    fn shutdown_while_the_store_fails_gives_the_entry_up_and_done_says_so() {
        let dir = tempfile::tempdir().unwrap();
        // Opened outside a runtime: no healer, so the store fails until the test ends.
        let store = Store::open(dir.path(), Duration::from_secs(3600)).unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let (trigger, shutdown) = Shutdown::new();
            let writer = AuditWriter::start(store.clone(), shutdown);
            store.fail_for_test();
            trigger.fire();
            writer.send(&store, entries(1, 1)).await;
            assert!(
                !writer.done().await,
                "an entry was given up: the offset is held"
            );
        });
    }

    #[tokio::test]
    async fn other_pods_audit_entries_are_all_stored_once_the_writer_says_done() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Duration::from_secs(3600)).unwrap();
        let writer = AuditWriter::start(store.clone(), Shutdown::never());
        for offset in 0..20u64 {
            writer.send(&store, entries(offset, 10)).await;
        }
        assert!(writer.done().await);
        assert_eq!(store.audit_all().count(), 200);
    }
}
