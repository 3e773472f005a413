//! The fleet: what every pod shares through the broker, so that the promises of SPEC §5 hold
//! across all of them (SPEC §9). RabbitMQ is the only shared system.
//!
//! Each pod's sled store and its live [`claims`] (in memory) are a materialized view of one
//! **ledger**, a RabbitMQ stream (`amqp.ledger_stream`). Pods append claim, release and outcome
//! [`record::Record`]s; every pod's [`reader`] applies the whole stream in order with the same
//! rule ([`apply`]), so "the first live claim for a key wins" is decided alike everywhere
//! without the pods talking to each other. A pod remembers the last offset it applied and
//! saves its claims now and then (a restart resumes); an empty store reads from the start, and
//! the pod is not ready until it has caught up.
//!
//! The deployment's one rate budget is shared the same way: [`budget`] hears every live pod's
//! heartbeat through a fanout exchange and gives this pod `budget ÷ live pods`.
//!
//! This folder uses the infrastructure (amqp, store, config, health, internal_events); the
//! worker uses it. It knows nothing of Genesys or the forwarder.

mod appender;
pub mod apply;
pub mod budget;
pub mod claims;
pub mod reader;
pub mod record;
pub mod run;
pub mod unseen;
pub mod writer;

use crate::amqp::shell::SharedConnection;
use crate::amqp::AmqpError;
use crate::config::Settings;
use crate::health::Health;
use crate::shutdown::Shutdown;
use crate::store::{now_ms, Store};
use appender::{Append, Appender};
use apply::Decision;
use record::{OutcomeRecord, Record};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// How long a claim may take to come back through the ledger before the ledger counts as
/// unreachable (the delivery is then requeued; no call is made without a claim).
pub const CLAIM_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("cannot append to the fleet ledger: {0}")]
    Append(#[from] AmqpError),
    #[error("the fleet ledger did not confirm the claim within {0:?}; is the ledger reader connected? No call is made without a claim")]
    Unconfirmed(Duration),
}

/// This pod's handle on the fleet: appends records and waits for the reader's decisions.
pub struct Fleet {
    settings: Arc<Settings>,
    store: Store,
    health: Arc<Health>,
    worker_id: String,
    /// This pod's claims on their way through the ledger, by key (a key is claimed under its
    /// per-key lock, so once at a time).
    waiters: Mutex<HashMap<String, Waiter>>,
    /// This pod's own outcomes on their way through the ledger, by key.
    told: Mutex<HashMap<String, Told>>,
    caught_up: watch::Sender<bool>,
    /// The live claims as the reader has applied them (loaded and kept by [`reader`]).
    claims: Mutex<claims::Claims>,
    /// Records on their way to the ledger; one task publishes them in batches ([`appender`]).
    appends: mpsc::UnboundedSender<Append>,
}

/// A claim of this pod's that the reader has not applied yet.
struct Waiter {
    claim_id: String,
    /// Still true when the claim is made on a key the store held `in_progress` for it and no
    /// record the reader applied since touched the key ([`apply::Known::Open`]).
    open: bool,
    /// Set once the claim is appended; the reader hands the decision here.
    decision: Option<oneshot::Sender<Decision>>,
}

/// An own outcome the reader has not applied yet: stored here means the reader need not
/// read or write the store for it ([`apply::Known::Applied`]).
struct Told {
    updated_at_ms: u64,
    stored: bool,
}

/// A claim being made: registered before the key's local record is read, so that a record the
/// reader applies to that key from then on is noticed (see [`Fleet::intend`]). Dropped without
/// [`Fleet::claim`], it is forgotten.
pub struct Intent<'a> {
    fleet: &'a Fleet,
    key: String,
    claim_id: String,
}

impl Drop for Intent<'_> {
    fn drop(&mut self) {
        let mut waiters = self.fleet.waiters_lock();
        if waiters
            .get(&self.key)
            .is_some_and(|w| w.claim_id == self.claim_id)
        {
            waiters.remove(&self.key);
        }
    }
}

/// A claim this pod holds; released or ended by an outcome.
#[derive(Debug, Clone)]
pub struct Held {
    pub claim_id: String,
    pub fingerprint: String,
}

impl Fleet {
    /// The fleet of a pod whose pipelines share `link`: the appender opens its own channel
    /// on it.
    pub fn new(
        settings: Arc<Settings>,
        store: Store,
        health: Arc<Health>,
        link: Arc<SharedConnection>,
    ) -> Arc<Self> {
        let (caught_up, _) = watch::channel(false);
        health.set_ledger_ready(false);
        let (appends, rx) = mpsc::unbounded_channel();
        let appender = Appender::new(settings.amqp.ledger_stream.clone(), link);
        tokio::spawn(appender.run(rx));
        Arc::new(Self {
            appends,
            worker_id: settings.worker_id(),
            settings,
            store,
            health,
            waiters: Mutex::new(HashMap::new()),
            told: Mutex::new(HashMap::new()),
            caught_up,
            claims: Mutex::new(claims::Claims::default()),
        })
    }

    /// Whether the fleet's view still has a claim of this pod's on `key`: no outcome of this
    /// pod's for it reached the ledger (the pod stopped between its durable record and the
    /// ledger's confirm, or the append failed).
    pub fn unheard(&self, key: &str) -> bool {
        self.claims_lock()
            .get(key)
            .is_some_and(|c| c.worker_id == self.worker_id)
    }

    fn claims_lock(&self) -> std::sync::MutexGuard<'_, claims::Claims> {
        self.claims.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run the ledger reader until shutdown.
    pub async fn run_reader(
        self: Arc<Self>,
        shutdown: Shutdown,
        link: Option<Arc<crate::amqp::shell::SharedConnection>>,
    ) -> Result<(), AmqpError> {
        reader::run(self, shutdown, link).await
    }

    /// Resolves once the reader has applied everything appended before it connected.
    /// Returns false if shutdown came first.
    pub async fn caught_up(&self, shutdown: &mut Shutdown) -> bool {
        let mut rx = self.caught_up.subscribe();
        tokio::select! {
            r = rx.wait_for(|v| *v) => r.is_ok(),
            _ = shutdown.requested() => false,
        }
    }

    fn set_caught_up(&self, v: bool) {
        self.caught_up.send_replace(v);
        self.health.set_ledger_ready(v);
    }

    /// Begin claiming `key`: call before reading the key's local record, then [`Fleet::claim`].
    pub fn intend(&self, key: &str) -> Intent<'_> {
        let claim_id = uuid::Uuid::new_v4().simple().to_string();
        self.waiters_lock().insert(
            key.to_string(),
            Waiter {
                claim_id: claim_id.clone(),
                open: true,
                decision: None,
            },
        );
        Intent {
            fleet: self,
            key: key.to_string(),
            claim_id,
        }
    }

    /// Claim the key for a call, or learn who holds it or what its outcome was. `open`: the
    /// local record read after [`Fleet::intend`] was made `in_progress` for this claim (then,
    /// unless the reader touches the key meanwhile, it need not read the store to decide).
    pub async fn claim(
        &self,
        intent: Intent<'_>,
        fingerprint: &str,
        open: bool,
    ) -> Result<(Held, Decision), FleetError> {
        let started = std::time::Instant::now();
        let key = intent.key.clone();
        let claim_id = intent.claim_id.clone();
        let (tx, rx) = oneshot::channel();
        {
            let mut waiters = self.waiters_lock();
            let waiter = waiters.entry(key.clone()).or_insert_with(|| Waiter {
                claim_id: claim_id.clone(),
                open: false,
                decision: None,
            });
            if waiter.claim_id != claim_id {
                // Not this intent's any more (only a bug could do that): no shortcut.
                waiter.claim_id = claim_id.clone();
                waiter.open = false;
            }
            waiter.open &= open;
            waiter.decision = Some(tx);
        }
        let record = self.claim_record(&key, &claim_id, fingerprint);
        if let Err(e) = self.append(record).await {
            return Err(e.into());
        }
        let held = Held {
            claim_id,
            fingerprint: fingerprint.to_string(),
        };
        match tokio::time::timeout(CLAIM_TIMEOUT, rx).await {
            Ok(Ok(decision)) => {
                crate::metrics::metrics()
                    .ledger_claim_seconds
                    .observe(started.elapsed().as_secs_f64());
                Ok((held, decision))
            }
            _ => {
                drop(intent);
                // The claim may still land: give it back so nobody waits out its lease.
                let _ = self.release(&key, &held).await;
                Err(FleetError::Unconfirmed(CLAIM_TIMEOUT))
            }
        }
    }

    /// Renew a held claim while its call runs.
    pub async fn renew(&self, key: &str, held: &Held) -> Result<(), FleetError> {
        let record = self.claim_record(key, &held.claim_id, &held.fingerprint);
        Ok(self.append(record).await?)
    }

    /// Give a key back without an outcome.
    pub async fn release(&self, key: &str, held: &Held) -> Result<(), FleetError> {
        let record = Record::Release {
            key: key.to_string(),
            claim_id: held.claim_id.clone(),
        };
        Ok(self.append(record).await?)
    }

    /// Tell the fleet a key's outcome. `stored`: this pod's store holds it already (else call
    /// [`Fleet::stored`] once it does, so the reader need not read the store for it).
    pub async fn outcome(&self, outcome: OutcomeRecord, stored: bool) -> Result<(), FleetError> {
        let key = outcome.key.clone();
        let updated_at_ms = outcome.head.updated_at_ms;
        self.telling(&key, updated_at_ms, stored);
        let appended = self.append(Record::Outcome(outcome)).await;
        if appended.is_err() {
            self.take_told(&key, updated_at_ms);
        }
        Ok(appended?)
    }

    fn telling(&self, key: &str, updated_at_ms: u64, stored: bool) {
        self.told_lock().insert(
            key.to_string(),
            Told {
                updated_at_ms,
                stored,
            },
        );
    }

    /// The outcome told for `key` (made at `updated_at_ms`) is in this pod's store now.
    pub fn stored(&self, key: &str, updated_at_ms: u64) {
        if let Some(told) = self.told_lock().get_mut(key) {
            if told.updated_at_ms == updated_at_ms {
                told.stored = true;
            }
        }
    }

    /// For the reader: this pod's outcome for `key` (made at `updated_at_ms`) has come through
    /// the ledger. True if the store holds it already.
    fn take_told(&self, key: &str, updated_at_ms: u64) -> bool {
        let mut told = self.told_lock();
        match told.get(key) {
            Some(t) if t.updated_at_ms == updated_at_ms => {
                told.remove(key).is_some_and(|t| t.stored)
            }
            _ => false,
        }
    }

    /// For the reader: whether this pod's claim `claim_id` on `key` is still open (see
    /// [`apply::Known::Open`]).
    fn open(&self, key: &str, claim_id: &str) -> bool {
        self.waiters_lock()
            .get(key)
            .is_some_and(|w| w.claim_id == claim_id && w.open)
    }

    /// For the reader: it has applied (store written) a record that may have changed `key`,
    /// so a claim of this pod's being made on it must read the store to be decided.
    fn touched(&self, key: &str) {
        if let Some(w) = self.waiters_lock().get_mut(key) {
            w.open = false;
        }
    }

    /// How often a held claim is renewed: a third of the lease.
    pub fn renew_every(&self) -> Duration {
        (self.settings.worker.claim_lease / 3).max(Duration::from_millis(300))
    }

    fn claim_record(&self, key: &str, claim_id: &str, fingerprint: &str) -> Record {
        Record::Claim {
            key: key.to_string(),
            claim_id: claim_id.to_string(),
            worker_id: self.worker_id.clone(),
            fingerprint: fingerprint.to_string(),
            at_ms: now_ms(),
            lease_ms: self.settings.worker.claim_lease.as_millis() as u64,
        }
    }

    async fn append(&self, record: Record) -> Result<(), AmqpError> {
        let (done, confirmed) = oneshot::channel();
        let append = Append { record, done };
        let gone = || AmqpError::op("append to the fleet ledger", "the appending task stopped");
        self.appends.send(append).map_err(|_| gone())?;
        confirmed
            .await
            .map_err(|_| gone())?
            .map_err(|e| AmqpError::op("append to the fleet ledger", e))
    }

    fn waiters_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Waiter>> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn told_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Told>> {
        self.told.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hand a decision to the task waiting for it, if it is this pod's.
    fn decided(&self, key: &str, claim_id: &str, decision: Decision) {
        let waiter = {
            let mut waiters = self.waiters_lock();
            match waiters.get(key) {
                Some(w) if w.claim_id == claim_id && w.decision.is_some() => waiters.remove(key),
                _ => None,
            }
        };
        if let Some(tx) = waiter.and_then(|w| w.decision) {
            let _ = tx.send(decision);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet() -> (tempfile::TempDir, Arc<Fleet>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Duration::from_secs(3600)).unwrap();
        let settings = Settings::load_from(None, &HashMap::new()).unwrap();
        let link = SharedConnection::new(&settings.amqp, "test");
        let fleet = Fleet::new(Arc::new(settings), store, Arc::new(Health::default()), link);
        (dir, fleet)
    }

    #[tokio::test]
    async fn a_claim_is_open_until_the_reader_touches_its_key() {
        let (_d, f) = fleet();
        let intent = f.intend("k");
        let id = intent.claim_id.clone();
        assert!(f.open("k", &id));
        assert!(!f.open("k", "another claim"));
        assert!(!f.open("j", &id));
        f.touched("j");
        assert!(f.open("k", &id));
        f.touched("k");
        assert!(!f.open("k", &id));
        // Given up (a replay, a conflict, an error): forgotten.
        drop(intent);
        assert!(f.waiters_lock().is_empty());
    }

    #[tokio::test]
    async fn an_own_outcome_counts_as_stored_only_once_the_worker_said_so() {
        let (_d, f) = fleet();
        // The reader gets there first: it reads the store.
        f.telling("k", 5, false);
        f.stored("k", 4);
        assert!(!f.take_told("k", 5));
        f.stored("k", 5);
        assert!(f.told_lock().is_empty());
        // The worker first: the reader skips the store.
        f.telling("k", 6, false);
        f.stored("k", 6);
        assert!(!f.take_told("k", 5), "another outcome of the key");
        assert!(f.take_told("k", 6));
        assert!(f.told_lock().is_empty());
    }
}
