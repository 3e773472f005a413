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
use reader::known::Progress;
use reader::{Command, LedgerReader};
use record::{OutcomeRecord, Record};
use std::sync::Arc;
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
    #[error("the fleet ledger reader has stopped: no claim can be decided without it")]
    ReaderGone,
}

/// This pod's handle on the fleet: appends records, and asks the ledger reader (which owns
/// the fleet's view, [`reader`]) for decisions.
pub struct Fleet {
    settings: Arc<Settings>,
    worker_id: String,
    /// To the reader loop; it handles them before the next ledger message.
    commands: mpsc::UnboundedSender<Command>,
    /// How far the reader's store writes have come ([`Seen`]).
    progress: Progress,
    caught_up: watch::Receiver<bool>,
    /// Records on their way to the ledger; one task publishes them in batches ([`appender`]).
    appends: mpsc::UnboundedSender<Append>,
}

/// The reader's progress, read before the worker reads a key's local record: a claim made on
/// what that read found is decided without the reader reading the store again, unless the
/// reader wrote the key since ([`reader::known`]). A number, nothing to give back.
#[derive(Debug, Clone, Copy)]
pub struct Seen(u64);

/// A claim this pod holds; released or ended by an outcome.
#[derive(Debug, Clone)]
pub struct Held {
    pub claim_id: String,
    pub fingerprint: String,
}

impl Fleet {
    /// The fleet of a pod whose pipelines share `link` (the appender opens its own channel
    /// on it), and the ledger reader to run.
    pub fn new(
        settings: Arc<Settings>,
        store: Store,
        health: Arc<Health>,
        link: Arc<SharedConnection>,
    ) -> (Arc<Self>, LedgerReader) {
        let (caught_up_tx, caught_up) = watch::channel(false);
        health.set_ledger_ready(false);
        let (appends, rx) = mpsc::unbounded_channel();
        let appender = Appender::new(settings.amqp.ledger_stream.clone(), link);
        tokio::spawn(appender.run(rx));
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let progress = Progress::default();
        let reader = LedgerReader {
            settings: settings.clone(),
            worker_id: settings.worker_id(),
            store,
            health,
            commands: commands_rx,
            caught_up: caught_up_tx,
            progress: progress.clone(),
        };
        let fleet = Arc::new(Self {
            worker_id: settings.worker_id(),
            settings,
            commands,
            progress,
            caught_up,
            appends,
        });
        (fleet, reader)
    }

    /// Whether the fleet's view still has a claim of this pod's on `key`: no outcome of this
    /// pod's for it reached the ledger (the pod stopped between its durable record and the
    /// ledger's confirm, or the append failed). Unanswered (the reader is stuck on a failing
    /// store), it counts as unheard: telling an outcome again is harmless.
    pub async fn unheard(&self, key: &str) -> bool {
        let (answer, rx) = oneshot::channel();
        let key = key.to_string();
        if self
            .commands
            .send(Command::Unheard { key, answer })
            .is_err()
        {
            return true;
        }
        tokio::time::timeout(CLAIM_TIMEOUT, rx)
            .await
            .map_or(true, |a| a.unwrap_or(true))
    }

    /// Which of `keys` a live fleet claim holds now, and by which pod (replay plans ask,
    /// through the admin endpoint).
    pub async fn live_claims(
        &self,
        keys: Vec<String>,
    ) -> Result<Vec<(String, String)>, FleetError> {
        let (answer, rx) = oneshot::channel();
        self.commands
            .send(Command::LiveClaims { keys, answer })
            .map_err(|_| FleetError::ReaderGone)?;
        match tokio::time::timeout(CLAIM_TIMEOUT, rx).await {
            Ok(Ok(holders)) => Ok(holders),
            _ => Err(FleetError::ReaderGone),
        }
    }

    /// Resolves once the reader has applied everything appended before it connected.
    /// Returns false if shutdown came first.
    pub async fn caught_up(&self, shutdown: &mut Shutdown) -> bool {
        let mut rx = self.caught_up.clone();
        tokio::select! {
            r = rx.wait_for(|v| *v) => r.is_ok(),
            _ = shutdown.requested() => false,
        }
    }

    /// Read before the key's local record (see [`Seen`]).
    pub fn seen(&self) -> Seen {
        Seen(self.progress.read())
    }

    /// Claim the key for a call, or learn who holds it or what its outcome was. `open`: the
    /// local record read after `open`'s [`Fleet::seen`] was made `in_progress` for this claim
    /// (`None` if it held anything else).
    pub async fn claim(
        &self,
        key: &str,
        fingerprint: &str,
        open: Option<Seen>,
    ) -> Result<(Held, Decision), FleetError> {
        let started = std::time::Instant::now();
        let claim_id = uuid::Uuid::new_v4().simple().to_string();
        let (decision, rx) = oneshot::channel();
        let waiting = Command::Claim {
            key: key.to_string(),
            claim_id: claim_id.clone(),
            open_since: open.map(|s| s.0),
            decision,
        };
        self.commands
            .send(waiting)
            .map_err(|_| FleetError::ReaderGone)?;
        // Sent before the append: the reader knows the claim before its record comes back.
        let abandon = Abandon {
            commands: &self.commands,
            key,
            claim_id: &claim_id,
        };
        self.append(self.claim_record(key, &claim_id, fingerprint))
            .await?;
        let held = Held {
            claim_id: claim_id.clone(),
            fingerprint: fingerprint.to_string(),
        };
        match tokio::time::timeout(CLAIM_TIMEOUT, rx).await {
            Ok(Ok(decision)) => {
                std::mem::forget(abandon);
                crate::metrics::metrics()
                    .ledger_claim_seconds
                    .observe(started.elapsed().as_secs_f64());
                Ok((held, decision))
            }
            _ => {
                drop(abandon);
                // The claim may still land: give it back so nobody waits out its lease.
                let _ = self.release(key, &held).await;
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
        let tell = Command::Tell {
            key: key.clone(),
            updated_at_ms,
            stored,
        };
        let _ = self.commands.send(tell);
        let appended = self.append(Record::Outcome(outcome)).await;
        if appended.is_err() {
            let _ = self.commands.send(Command::Untell { key, updated_at_ms });
        }
        Ok(appended?)
    }

    /// The outcome told for `key` (made at `updated_at_ms`) is in this pod's store now.
    pub fn stored(&self, key: &str, updated_at_ms: u64) {
        let key = key.to_string();
        let _ = self.commands.send(Command::Stored { key, updated_at_ms });
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
}

/// Tells the reader a claim is no longer waited for, unless it was decided: dropped when the
/// append fails, the wait times out or the claiming task is cancelled.
struct Abandon<'a> {
    commands: &'a mpsc::UnboundedSender<Command>,
    key: &'a str,
    claim_id: &'a str,
}

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Abandon {
            key: self.key.to_string(),
            claim_id: self.claim_id.to_string(),
        });
    }
}
