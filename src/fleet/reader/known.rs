//! What the ledger reader knows of this pod's store without reading it, in one place, owned by
//! the reader: every pod decides alike either way, this only spares the reads it does not
//! need (two per request of this pod's own, on a store larger than its cache).
//!
//! - **Open claims.** A claim of this pod's whose key its store held `in_progress` for it
//!   when the worker read it has no outcome to find, unless the reader wrote the key since.
//!   The reader numbers its writes ([`Knowledge::touched`]) and publishes the number
//!   ([`Progress`]); the worker reads it before it reads its store and sends it with the
//!   claim ([`super::super::Seen`]). A key written after that number is read again.
//! - **Told outcomes.** An outcome of this pod's that its store holds already needs no read
//!   when it comes back through the ledger.
//! - **Unseen keys.** A pod restoring a new store has not written most keys yet
//!   ([`Unseen`]).
//!
//! It is also where the worker's waiting claims are: a claim's decision is handed to the task
//! that made it.

use super::super::apply::{Decision, Known};
use super::super::record::{OutcomeRecord, Record};
use super::super::unseen::Unseen;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::oneshot;

/// How many written keys the reader remembers by number. Beyond it, it forgets them all and
/// raises its floor: a claim whose number lies below the floor reads the store. (A worker sends
/// its claim microseconds after it read the number; a floor it falls under is rare.)
const TOUCHED_KEPT: usize = 4096;

/// How far the reader's store writes have come: written by the reader alone, read by the
/// worker before it reads its store.
#[derive(Clone, Default)]
pub struct Progress(Arc<AtomicU64>);

impl Progress {
    pub fn read(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    fn publish(&self, n: u64) {
        self.0.store(n, Ordering::Release);
    }
}

/// A claim of this pod's that the reader has not applied yet.
struct Waiter {
    claim_id: String,
    /// The reader's progress when the worker read its store and found the key `in_progress`
    /// for this claim; `None` if it found anything else.
    open_since: Option<u64>,
    decision: oneshot::Sender<Decision>,
}

/// An own outcome the reader has not applied yet.
struct Told {
    updated_at_ms: u64,
    stored: bool,
}

pub struct Knowledge {
    worker_id: String,
    waiters: HashMap<String, Waiter>,
    told: HashMap<String, Told>,
    /// Keys written, by the number of the write.
    touched: HashMap<String, u64>,
    /// Writes numbered at or below it are forgotten.
    floor: u64,
    writes: u64,
    progress: Progress,
    /// While this pod restores a new store: the keys it has stored so far.
    unseen: Option<Unseen>,
}

impl Knowledge {
    pub fn new(worker_id: String, progress: Progress, restoring: bool) -> Self {
        Self {
            worker_id,
            waiters: HashMap::new(),
            told: HashMap::new(),
            touched: HashMap::new(),
            floor: 0,
            writes: progress.read(),
            progress,
            unseen: restoring.then(Unseen::new),
        }
    }

    /// A claim of this pod's is on its way: its decision goes to `decision`.
    pub fn wait(
        &mut self,
        key: String,
        claim_id: String,
        open_since: Option<u64>,
        decision: oneshot::Sender<Decision>,
    ) {
        let waiter = Waiter {
            claim_id,
            open_since,
            decision,
        };
        self.waiters.insert(key, waiter);
    }

    /// The claim's task gave up waiting (it timed out, or its append failed).
    pub fn abandon(&mut self, key: &str, claim_id: &str) {
        if self
            .waiters
            .get(key)
            .is_some_and(|w| w.claim_id == claim_id)
        {
            self.waiters.remove(key);
        }
    }

    /// Hand a decision to the task waiting for it, if it is this pod's.
    pub fn decided(&mut self, key: &str, claim_id: &str, decision: Decision) {
        if self
            .waiters
            .get(key)
            .is_some_and(|w| w.claim_id == claim_id)
        {
            if let Some(w) = self.waiters.remove(key) {
                let _ = w.decision.send(decision);
            }
        }
    }

    /// An own outcome is on its way to the ledger; `stored`: the store holds it already.
    pub fn tell(&mut self, key: String, updated_at_ms: u64, stored: bool) {
        let told = Told {
            updated_at_ms,
            stored,
        };
        self.told.insert(key, told);
    }

    /// The outcome told for `key` did not reach the ledger.
    pub fn untell(&mut self, key: &str, updated_at_ms: u64) {
        if self
            .told
            .get(key)
            .is_some_and(|t| t.updated_at_ms == updated_at_ms)
        {
            self.told.remove(key);
        }
    }

    /// The outcome told for `key` is in the store now.
    pub fn stored(&mut self, key: &str, updated_at_ms: u64) {
        if let Some(told) = self.told.get_mut(key) {
            if told.updated_at_ms == updated_at_ms {
                told.stored = true;
            }
        }
    }

    /// What the reader knows of its store for a record it has not applied before. Asked once
    /// per record (it takes an own outcome's note).
    pub fn known(&mut self, record: &Record) -> Known {
        let known = match record {
            Record::Claim {
                key,
                claim_id,
                worker_id,
                ..
            } if *worker_id == self.worker_id && self.open(key, claim_id) => Known::Open,
            Record::Outcome(OutcomeRecord { key, head, .. })
                if head.worker_id == self.worker_id && self.take_told(key, head.updated_at_ms) =>
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
            ) if self.unseen.as_ref().is_some_and(|u| u.unseen(key)) => Known::Absent,
            _ => known,
        }
    }

    fn open(&self, key: &str, claim_id: &str) -> bool {
        let Some(since) = self
            .waiters
            .get(key)
            .filter(|w| w.claim_id == claim_id)
            .and_then(|w| w.open_since)
        else {
            return false;
        };
        since >= self.floor && self.touched.get(key).is_none_or(|n| *n <= since)
    }

    fn take_told(&mut self, key: &str, updated_at_ms: u64) -> bool {
        match self.told.get(key) {
            Some(t) if t.updated_at_ms == updated_at_ms => {
                self.told.remove(key).is_some_and(|t| t.stored)
            }
            _ => false,
        }
    }

    /// The reader has written `key` in the store (called after the write): a claim whose
    /// worker read the store before may not have seen it.
    pub fn touched(&mut self, key: &str) {
        self.writes += 1;
        if self.touched.len() >= TOUCHED_KEPT {
            self.touched.clear();
            self.floor = self.writes - 1;
        }
        self.touched.insert(key.to_string(), self.writes);
        self.progress.publish(self.writes);
    }

    /// A restoring store now holds `key`.
    pub fn restored(&mut self, key: &str) {
        if let Some(unseen) = self.unseen.as_mut() {
            unseen.insert(key);
        }
    }

    pub fn restoring(&self) -> bool {
        self.unseen.is_some()
    }

    /// Caught up: the worker writes the store from now on.
    pub fn caught_up(&mut self) {
        self.unseen = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(key: &str, claim_id: &str, worker_id: &str) -> Record {
        Record::Claim {
            key: key.into(),
            claim_id: claim_id.into(),
            worker_id: worker_id.into(),
            fingerprint: "f".into(),
            at_ms: 1,
            lease_ms: 1000,
        }
    }

    fn knowledge() -> (Knowledge, Progress) {
        let progress = Progress::default();
        (
            Knowledge::new("me".into(), progress.clone(), false),
            progress,
        )
    }

    #[test]
    fn a_claim_is_open_unless_its_key_was_written_after_the_worker_read_the_store() {
        let (mut k, progress) = knowledge();
        let (tx, _rx) = oneshot::channel();
        let since = progress.read();
        k.wait("k".into(), "c1".into(), Some(since), tx);
        assert_eq!(k.known(&claim("k", "c1", "me")), Known::Open);
        assert_eq!(k.known(&claim("k", "other", "me")), Known::Nothing);
        assert_eq!(k.known(&claim("k", "c1", "another pod")), Known::Nothing);
        k.touched("j");
        assert_eq!(k.known(&claim("k", "c1", "me")), Known::Open);
        k.touched("k");
        assert_eq!(k.known(&claim("k", "c1", "me")), Known::Nothing);
        // Read after that write: open again.
        let (tx, _rx) = oneshot::channel();
        k.wait("k".into(), "c2".into(), Some(progress.read()), tx);
        assert_eq!(k.known(&claim("k", "c2", "me")), Known::Open);
        // Found anything but `in_progress`: never open.
        let (tx, _rx) = oneshot::channel();
        k.wait("k".into(), "c3".into(), None, tx);
        assert_eq!(k.known(&claim("k", "c3", "me")), Known::Nothing);
    }

    #[test]
    fn a_claim_older_than_what_the_reader_remembers_reads_the_store() {
        let (mut k, progress) = knowledge();
        let since = progress.read();
        for i in 0..TOUCHED_KEPT + 1 {
            k.touched(&format!("other-{i}"));
        }
        let (tx, _rx) = oneshot::channel();
        k.wait("k".into(), "c1".into(), Some(since), tx);
        assert_eq!(k.known(&claim("k", "c1", "me")), Known::Nothing);
        let (tx, _rx) = oneshot::channel();
        k.wait("k".into(), "c2".into(), Some(progress.read()), tx);
        assert_eq!(k.known(&claim("k", "c2", "me")), Known::Open);
    }

    #[test]
    fn a_decision_goes_to_its_own_claim_once() {
        let (mut k, _) = knowledge();
        let (tx, mut rx) = oneshot::channel();
        k.wait("k".into(), "c1".into(), None, tx);
        k.decided("k", "another claim", Decision::Won);
        assert!(rx.try_recv().is_err());
        k.decided("k", "c1", Decision::Won);
        assert_eq!(rx.try_recv().ok(), Some(Decision::Won));
        assert!(k.waiters.is_empty());
        let (tx, _rx) = oneshot::channel();
        k.wait("k".into(), "c2".into(), None, tx);
        k.abandon("k", "c1");
        assert_eq!(k.waiters.len(), 1);
        k.abandon("k", "c2");
        assert!(k.waiters.is_empty());
    }

    #[test]
    fn an_own_outcome_counts_as_stored_only_once_the_worker_said_so() {
        let (mut k, _) = knowledge();
        // The reader gets there first: it reads the store.
        k.tell("k".into(), 5, false);
        k.stored("k", 4);
        assert!(!k.take_told("k", 5));
        k.stored("k", 5);
        assert!(k.told.is_empty());
        // The worker first: the reader skips the store.
        k.tell("k".into(), 6, false);
        k.stored("k", 6);
        assert!(!k.take_told("k", 5), "another outcome of the key");
        assert!(k.take_told("k", 6));
        k.tell("k".into(), 7, true);
        k.untell("k", 7);
        assert!(k.told.is_empty());
    }
}
