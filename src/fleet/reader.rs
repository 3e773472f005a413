//! The ledger reader: one loop that owns the fleet's view. It consumes the ledger stream in
//! order, applies each record to the live claims ([`Claims`], in memory) and the store with
//! the one rule of [`super::apply`], remembers the offset, and hands claim decisions to the
//! tasks waiting for them. On each (re)connect its [`feed`] appends a mark, and the loop
//! reports caught up once it reads that mark back. It saves the claims every few seconds and
//! when it stops; a restart loads them and reads on from their offset, applying to the claims
//! alone what the store already holds. What it has to store besides (other pods' audit
//! entries; a new store's records while it restores) goes to its [`Writer`], a thread of its
//! own.
//!
//! The worker talks to it through [`super::Fleet`], whose calls arrive here as [`Command`]s.
//! Commands go first (`biased`): a claim or an outcome is sent before its record is appended,
//! so the loop always knows it before the record comes back through the ledger. What the
//! loop knows without reading the store is in one place, [`known`].

mod command;
mod feed;
pub mod known;

pub use command::Command;

use super::apply::{apply, Applied, Known};
use super::claims::{Claims, SNAPSHOT_EVERY};
use super::record::Json;
use super::record::{OutcomeRecord, Record};
use super::writer::{Batch, ForeignAudit, Writer, APPLY_TRIES};
use crate::amqp::consumer::REQUEUE_PAUSE;
use crate::amqp::shell::{self, SharedConnection, ShellOptions};
use crate::amqp::{header_i64, AmqpError};
use crate::config::Settings;
use crate::health::Health;
use crate::internal_events;
use crate::metrics::metrics;
use crate::shutdown::Shutdown;
use crate::store::{AuditEntry, Store};
use feed::{Fed, Feed};
use known::{Knowledge, Progress};
use lapin::message::Delivery;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, watch};

/// Stream deliveries the broker may push ahead of the reader (a stream consumer needs one).
const PREFETCH: u16 = 200;

/// How often a pod restoring a new store saves its offset (and so stores its current run of
/// records, `super::run`): a crash then reads at most this much of the ledger again.
const RESTORE_SNAPSHOT_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// The reader as handed out by [`super::Fleet::new`], to be run once.
pub struct LedgerReader {
    pub(super) settings: Arc<Settings>,
    pub(super) worker_id: String,
    pub(super) store: Store,
    pub(super) health: Arc<Health>,
    pub(super) commands: mpsc::UnboundedReceiver<Command>,
    pub(super) caught_up: watch::Sender<bool>,
    pub(super) progress: Progress,
}

/// The running loop's state: all of it its own.
struct Reading {
    settings: Arc<Settings>,
    worker_id: String,
    store: Store,
    health: Arc<Health>,
    caught_up: watch::Sender<bool>,
    claims: Claims,
    /// Published for the feed: where a new consumer starts.
    offset: watch::Sender<Option<u64>>,
    knowledge: Knowledge,
    /// The store's ledger offset at start: records up to it are already in the store.
    stored: Option<u64>,
    saved_at: Instant,
    /// The mark appended on this connection.
    mark: Option<String>,
    /// Set when shutdown came while a record waited for a failing store: nothing after it is
    /// applied or remembered, so the next start resumes at that record.
    stopped: bool,
    shutdown: Shutdown,
    /// Stores other pods' audit entries and a restoring store's records beside the reader.
    writer: Writer,
    /// Records handed to the writer that the store may not show yet: the next store read
    /// waits for the writer first.
    unflushed: bool,
}

/// How applying one record ended.
enum Tried {
    Applied(Applied),
    /// Failed against a healthy store `APPLY_TRIES` times: skipped.
    Skipped,
    /// Shutdown came while the store failed: the reader stops at this record.
    Stopped,
}

impl LedgerReader {
    /// Run until shutdown: load the claims, then read the ledger and answer the worker.
    pub async fn run(
        mut self,
        shutdown: Shutdown,
        link: Option<Arc<SharedConnection>>,
    ) -> Result<(), AmqpError> {
        let s = self.settings.clone();
        let opts = ShellOptions {
            name: format!("session-worker ledger {}", self.worker_id),
            queue: s.amqp.ledger_stream.clone(),
            tag_prefix: format!("{}-ledger", self.worker_id),
            prefetch: PREFETCH,
            concurrency: 1,
            grace: s.worker.shutdown_grace,
            link,
        };
        let health = self.health.clone();
        let mut commands = std::mem::replace(&mut self.commands, mpsc::unbounded_channel().1);
        let (mut reading, offset) = self.start(shutdown.clone());
        let (fed, mut feed_rx) = mpsc::unbounded_channel();
        let feed = Arc::new(Feed {
            settings: s.clone(),
            worker_id: reading.worker_id.clone(),
            fed,
            offset,
        });
        let consuming = shell::run(&s.amqp, &opts, feed, &health, shutdown);
        tokio::pin!(consuming);
        let result = loop {
            tokio::select! {
                biased;
                Some(command) = commands.recv() => reading.command(command),
                Some(fed) = feed_rx.recv() => reading.fed(fed).await,
                result = &mut consuming => break result,
            }
        };
        reading.save_claims().await;
        result
    }

    fn start(self, shutdown: Shutdown) -> (Reading, watch::Receiver<Option<u64>>) {
        let claims = Claims::load_or_rebuild(&self.store);
        let stored = self.store.ledger_offset().ok().flatten();
        tracing::info!(
            claims = claims.len(),
            from_offset = claims.offset(),
            store_offset = stored,
            "fleet claims loaded"
        );
        let (offset, offset_rx) = watch::channel(claims.offset());
        // Until caught up, the reader is the only writer of idempotency records and outcomes'
        // audit entries (the worker takes no delivery before), so on a new store it knows
        // which keys are there.
        let restoring = matches!(self.store.is_new(), Ok(true));
        let reading = Reading {
            knowledge: Knowledge::new(self.worker_id.clone(), self.progress, restoring),
            writer: Writer::start(self.store.clone(), shutdown.clone()),
            settings: self.settings,
            worker_id: self.worker_id,
            store: self.store,
            health: self.health,
            caught_up: self.caught_up,
            claims,
            offset,
            stored,
            saved_at: Instant::now(),
            mark: None,
            stopped: false,
            shutdown,
            unflushed: false,
        };
        (reading, offset_rx)
    }
}

impl Reading {
    fn command(&mut self, command: Command) {
        let k = &mut self.knowledge;
        match command {
            Command::Claim {
                key,
                claim_id,
                open_since,
                decision,
            } => k.wait(key, claim_id, open_since, decision),
            Command::Abandon { key, claim_id } => k.abandon(&key, &claim_id),
            Command::Tell {
                key,
                updated_at_ms,
                stored,
            } => k.tell(key, updated_at_ms, stored),
            Command::Untell { key, updated_at_ms } => k.untell(&key, updated_at_ms),
            Command::Stored { key, updated_at_ms } => k.stored(&key, updated_at_ms),
            Command::Unheard { key, answer } => {
                let mine = self.claims.get(&key);
                let _ = answer.send(mine.is_some_and(|c| c.worker_id == self.worker_id));
            }
            Command::LiveClaims { keys, answer } => {
                let _ = answer.send(self.claims.holders(keys, crate::store::now_ms()));
            }
        }
    }

    async fn fed(&mut self, fed: Fed) {
        match fed {
            Fed::Connected { mark } => self.mark = Some(mark),
            Fed::Message(delivery, done) => {
                self.apply(&delivery).await;
                let _ = done.send(());
            }
            Fed::Disconnected => self.set_caught_up(false),
        }
    }

    fn set_caught_up(&self, v: bool) {
        self.caught_up.send_replace(v);
        self.health.set_ledger_ready(v);
    }

    async fn apply(&mut self, delivery: &Delivery) {
        if self.stopped {
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
        &mut self,
        record: &Record,
        offset: Option<i64>,
        index: usize,
        batch: &mut Batch,
    ) -> bool {
        let position = offset.and_then(|o| u64::try_from(o).ok());
        let replay = match (position, self.stored) {
            (Some(o), Some(stored)) => o <= stored,
            _ => false,
        };
        let known = if replay {
            Known::Applied
        } else {
            self.knowledge.known(record)
        };
        if known != Known::Absent && !self.flushed(batch).await {
            self.stopped = true;
            return false;
        }
        let applied = match self.apply_retrying(record, known, offset).await {
            Tried::Applied(a) => a,
            Tried::Skipped => return true,
            Tried::Stopped => return false,
        };
        metrics().ledger_applied.inc();
        if let Record::Outcome(OutcomeRecord { key, .. }) = record {
            self.knowledge.restored(key);
        }
        if let Record::Outcome(OutcomeRecord { key, .. }) | Record::Forget { key } = record {
            // After the store write: a claim of this pod's whose worker read the store before
            // it is no longer open (`known`). (A restored record is written by the writer
            // later, but only before the first catch-up, when this pod makes no claims, and
            // any read of the store waits for it.)
            self.knowledge.touched(key);
        }
        self.hand_on(applied, record, position, offset, index, batch);
        true
    }

    /// Apply one record, trying again while the store heals; a record that keeps failing
    /// against a healthy store is skipped (it would stall the reader for good).
    async fn apply_retrying(
        &mut self,
        record: &Record,
        known: Known,
        offset: Option<i64>,
    ) -> Tried {
        let mut other_errors = 0u32;
        loop {
            let result = apply(
                &self.store,
                &mut self.claims,
                record,
                &self.worker_id,
                known,
            );
            match result {
                Ok(a) => return Tried::Applied(a),
                Err(e) => {
                    internal_events::ledger_apply_failed(&e);
                    if self.store.failure().is_none() {
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
                            self.store.writable(&mut shutdown).await
                        }
                        _ = shutdown.requested() => false,
                    };
                    if !healed {
                        tracing::warn!(offset, "shutdown while the store fails: the ledger reader stops here and resumes at this record");
                        self.stopped = true;
                        return Tried::Stopped;
                    }
                }
            }
        }
    }

    /// What an applied record means beyond the store: a claim decided, the catch-up mark met,
    /// a restored record or another pod's audit entry for the writer.
    fn hand_on(
        &mut self,
        applied: Applied,
        record: &Record,
        position: Option<u64>,
        offset: Option<i64>,
        index: usize,
        batch: &mut Batch,
    ) {
        match applied {
            Applied::Claim { claim_id, decision } => {
                if let Record::Claim { key, .. } = record {
                    self.knowledge.decided(key, &claim_id, decision);
                }
            }
            Applied::Mark { id } => {
                if self.mark.as_deref() == Some(id.as_str()) {
                    self.knowledge.caught_up();
                    tracing::info!(offset, "fleet ledger caught up");
                    self.set_caught_up(true);
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
                        if let Err(e) = self.store.put_json(&key, stored.text()) {
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

    /// Hand a message's batch to the writer.
    async fn hand_over(&mut self, batch: Batch) {
        if !batch.records.is_empty() {
            self.unflushed = true;
        }
        self.writer.send(batch).await;
    }

    /// Before a record that may read the store: hand over what this message has left to
    /// store so far and, if records went to the writer, wait until the store shows them.
    /// False if shutdown came while the store failed and something was given up.
    async fn flushed(&mut self, batch: &mut Batch) -> bool {
        if batch.records.is_empty() && !self.unflushed {
            return true;
        }
        self.hand_over(std::mem::take(batch)).await;
        let done = self.writer.done().await;
        self.unflushed = false;
        done
    }

    /// An entry without a ledger position (a stream always gives one) is appended as this
    /// pod's own.
    fn store_unpositioned(&self, audit: &Json<AuditEntry>, offset: Option<i64>) {
        match audit.parse() {
            Some(entry) => {
                if let Err(e) = self.store.append_audit(&entry) {
                    internal_events::ledger_apply_failed(&e);
                }
            }
            None => internal_events::ledger_record_skipped(offset, audit.text().len()),
        }
    }

    /// The message at `offset` is applied: note it in the claims, and now and then save the
    /// claims and the offset. Not a store write per message: what a restart reads again
    /// (at most [`SNAPSHOT_EVERY`] of the ledger, [`RESTORE_SNAPSHOT_EVERY`] while a new
    /// store restores) applies to the store again idempotently.
    async fn remember(&mut self, offset: Option<i64>) {
        let Some(o) = offset.and_then(|o| u64::try_from(o).ok()) else {
            return;
        };
        self.claims.set_offset(o);
        self.offset.send_replace(Some(o));
        // Restoring a new store, each save waits for the writer to store its run: saved
        // seldom, so the runs are long (`super::run`).
        let every = if self.knowledge.restoring() {
            RESTORE_SNAPSHOT_EVERY
        } else {
            SNAPSHOT_EVERY
        };
        if self.saved_at.elapsed() >= every {
            self.save_claims().await;
        }
    }

    /// Prune lapsed claims and save the rest with their offset, and note that offset as the
    /// store's (unless the store was further on already). First every audit entry of the
    /// records up to that offset is stored.
    async fn save_claims(&mut self) {
        if !self.writer.done().await {
            // Shutdown came while the store failed and an entry of a record before this
            // offset was not stored: the next start must read that record again.
            internal_events::ledger_offset_held();
            return;
        }
        let ttl = self.settings.store.idempotency_ttl;
        self.claims.prune(crate::store::now_ms(), ttl);
        if let Err(e) = self.claims.save(&self.store) {
            internal_events::ledger_apply_failed(&e);
        }
        if let Some(o) = self.claims.offset() {
            if self.stored.is_none_or(|stored| o > stored) {
                if let Err(e) = self.store.set_ledger_offset(o) {
                    internal_events::ledger_apply_failed(&e);
                }
            }
        }
        self.saved_at = Instant::now();
    }
}
