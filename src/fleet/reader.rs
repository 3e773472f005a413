//! The ledger reader: consumes the ledger stream in order (concurrency 1), applies each record
//! to the live claims ([`Claims`], in memory) and the store with the one rule of
//! [`super::apply`], remembers the offset, and hands claim decisions to the tasks waiting for
//! them. On each (re)connect it appends a mark and reports caught up once it reads that mark
//! back. It saves the claims every few seconds and when it stops; a restart loads them and
//! reads on from their offset, applying to the claims alone what the store already holds.
//! What it has to store besides (other pods' audit entries; a new store's records while it
//! restores) goes to its [`Writer`], a thread of its own.

use super::apply::{apply, Applied, Known};
use super::claims::{Claims, SNAPSHOT_EVERY};
use super::record::Json;
use super::record::{OutcomeRecord, Record, RECORD_TYPE};
use super::unseen::Unseen;
use super::writer::{Batch, ForeignAudit, Writer, APPLY_TRIES};
use super::Fleet;
use crate::amqp::consumer::{Settle, REQUEUE_PAUSE};
use crate::amqp::shell::{self, Pipeline, SharedConnection, ShellOptions};
use crate::amqp::{self, header_i64, topology, AmqpError};
use crate::internal_events;
use crate::metrics::metrics;
use crate::shutdown::Shutdown;
use crate::store::AuditEntry;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// Stream deliveries the broker may push ahead of the reader (a stream consumer needs one).
const PREFETCH: u16 = 200;

/// How often a pod restoring a new store saves its offset (and so stores its current run of
/// records, `super::run`): a crash then reads at most this much of the ledger again.
const RESTORE_SNAPSHOT_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

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
    /// Stores other pods' audit entries and a restoring store's records beside the reader.
    writer: Writer,
    /// Records handed to the writer that the store may not show yet: the next store read
    /// waits for the writer first.
    unflushed: AtomicBool,
    /// While a pod that started on a new store catches up: the keys the reader has stored,
    /// so it need not read the store for the others. Dropped once caught up.
    unseen: Mutex<Option<Unseen>>,
}

/// How applying one record ended.
enum Tried {
    Applied(Applied),
    /// Failed against a healthy store `APPLY_TRIES` times: skipped.
    Skipped,
    /// Shutdown came while the store failed: the reader stops at this record.
    Stopped,
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
    let writer = Writer::start(fleet.store.clone(), shutdown.clone());
    // Until caught up, the reader is the only writer of idempotency records and outcomes'
    // audit entries (the worker takes no delivery before), so on a new store it knows which
    // keys are there.
    let unseen = match fleet.store.is_new() {
        Ok(true) => Some(Unseen::new()),
        _ => None,
    };
    let reader = Arc::new(Reader {
        writer,
        unflushed: AtomicBool::new(false),
        fleet,
        stored,
        saved_at: Mutex::new(Instant::now()),
        mark: Mutex::new(None),
        stopped: AtomicBool::new(false),
        shutdown: shutdown.clone(),
        unseen: Mutex::new(unseen),
    });
    let result = shell::run(&s.amqp, &opts, reader.clone(), &health, shutdown).await;
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
        let mut batch = Batch::default();
        for (index, record) in records.into_iter().enumerate() {
            match record {
                Some(record) => {
                    if !self.apply_one(&record, offset, index, &mut batch).await {
                        return;
                    }
                }
                None => internal_events::ledger_record_skipped(offset, delivery.data.len()),
            }
        }
        self.hand_over(batch).await;
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
        batch: &mut Batch,
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
        if known != Known::Absent && !self.flushed(batch).await {
            self.stopped.store(true, Ordering::SeqCst);
            return false;
        }
        let applied = match self.apply_retrying(record, known, offset).await {
            Tried::Applied(a) => a,
            Tried::Skipped => return true,
            Tried::Stopped => return false,
        };
        metrics().ledger_applied.inc();
        if let Record::Outcome(OutcomeRecord { key, .. }) = record {
            if let Some(unseen) = self.unseen().as_mut() {
                unseen.insert(key);
            }
        }
        if let Record::Outcome(OutcomeRecord { key, .. }) | Record::Forget { key } = record {
            // After the store write: a claim of this pod's made on the key from its `intend`
            // on either saw that write or is no longer open (`Known::Open`). (A restored
            // record is written by the writer later, but only before the first catch-up,
            // when this pod makes no claims, and any read of the store waits for it.)
            fleet.touched(key);
        }
        self.hand_on(applied, record, position, offset, index, batch);
        true
    }

    /// Apply one record, trying again while the store heals; a record that keeps failing
    /// against a healthy store is skipped (it would stall the reader for good).
    async fn apply_retrying(&self, record: &Record, known: Known, offset: Option<i64>) -> Tried {
        let fleet = &self.fleet;
        let mut other_errors = 0u32;
        loop {
            let result = apply(
                &fleet.store,
                &mut self.claims(),
                record,
                &fleet.worker_id,
                known,
            );
            match result {
                Ok(a) => return Tried::Applied(a),
                Err(e) => {
                    internal_events::ledger_apply_failed(&e);
                    if fleet.store.failure().is_none() {
                        // Not the store failing but this record against it (a damaged
                        // record under its key): waiting would stall the reader for good.
                        other_errors += 1;
                        if other_errors >= APPLY_TRIES {
                            internal_events::ledger_record_skipped(offset, 0);
                            return Tried::Skipped;
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
                        return Tried::Stopped;
                    }
                }
            }
        }
    }

    /// What an applied record means beyond the store: a claim decided, the catch-up mark met,
    /// a restored record or another pod's audit entry for the writer.
    fn hand_on(
        &self,
        applied: Applied,
        record: &Record,
        position: Option<u64>,
        offset: Option<i64>,
        index: usize,
        batch: &mut Batch,
    ) {
        let fleet = &self.fleet;
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
                    tracing::info!(offset, "fleet ledger caught up");
                    fleet.set_caught_up(true);
                }
            }
            Applied::Restored {
                record: stored,
                audit,
                at_ms,
            } => {
                let key = match record {
                    Record::Outcome(OutcomeRecord { key, .. }) => key.clone(),
                    _ => String::new(),
                };
                match position {
                    Some(offset) => {
                        batch.records.push((key, stored));
                        batch.audits.push(ForeignAudit {
                            audit,
                            at_ms,
                            offset,
                            index,
                        });
                    }
                    // No position to file the entry under (a stream always gives one): stored
                    // here, as a record read the usual way.
                    None => {
                        if let Err(e) = fleet.store.put_json(&key, stored.text()) {
                            internal_events::ledger_apply_failed(&e);
                        }
                        self.store_unpositioned(&audit, offset);
                    }
                }
            }
            Applied::Foreign { audit, at_ms } => match position {
                Some(offset) => batch.audits.push(ForeignAudit {
                    audit,
                    at_ms,
                    offset,
                    index,
                }),
                None => self.store_unpositioned(&audit, offset),
            },
            Applied::Stranger => internal_events::ledger_record_skipped(offset, 0),
            Applied::Other => {}
        }
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

    /// Hand a message's batch to the writer.
    async fn hand_over(&self, batch: Batch) {
        if !batch.records.is_empty() {
            self.unflushed.store(true, Ordering::SeqCst);
        }
        self.writer.send(batch).await;
    }

    /// Before a record that may read the store: hand over what this message has left to
    /// store so far and, if records went to the writer, wait until the store shows them.
    /// False if shutdown came while the store failed and something was given up.
    async fn flushed(&self, batch: &mut Batch) -> bool {
        if batch.records.is_empty() && !self.unflushed.load(Ordering::SeqCst) {
            return true;
        }
        self.hand_over(std::mem::take(batch)).await;
        let done = self.writer.done().await;
        self.unflushed.store(false, Ordering::SeqCst);
        done
    }

    /// An entry without a ledger position (a stream always gives one) is appended as this
    /// pod's own.
    fn store_unpositioned(&self, audit: &Json<AuditEntry>, offset: Option<i64>) {
        match audit.parse() {
            Some(entry) => {
                if let Err(e) = self.fleet.store.append_audit(&entry) {
                    internal_events::ledger_apply_failed(&e);
                }
            }
            None => internal_events::ledger_record_skipped(offset, audit.text().len()),
        }
    }

    fn unseen(&self) -> MutexGuard<'_, Option<Unseen>> {
        self.unseen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The message at `offset` is applied: note it in the claims, and now and then save the
    /// claims and the offset. Not a store write per message: what a restart reads again
    /// (at most [`SNAPSHOT_EVERY`] of the ledger, [`RESTORE_SNAPSHOT_EVERY`] while a new
    /// store restores) applies to the store again idempotently.
    async fn remember(&self, offset: Option<i64>) {
        let Some(o) = offset.and_then(|o| u64::try_from(o).ok()) else {
            return;
        };
        self.claims().set_offset(o);
        // Restoring a new store, each save waits for the writer to store its run: saved
        // seldom, so the runs are long (`super::run`).
        let every = if self.unseen().is_some() {
            RESTORE_SNAPSHOT_EVERY
        } else {
            SNAPSHOT_EVERY
        };
        let due = self
            .saved_at
            .lock()
            .map(|at| at.elapsed() >= every)
            .unwrap_or(true);
        if due {
            self.save_claims().await;
        }
    }

    /// Prune lapsed claims and save the rest with their offset, and note that offset as the
    /// store's (unless the store was further on already). First every audit entry of the
    /// records up to that offset is stored.
    async fn save_claims(&self) {
        if !self.writer.done().await {
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
