//! The session worker: one delivery of `session.init.requests` at a time per task, through four
//! stages, each a file, in this order and never back:
//!
//! ```text
//! intake ──▶ claim ──▶ call ──▶ finish
//! (Job)     (store)   (Genesys) (record, audit, durable, publish, route, tell)
//! ```
//!
//! - [`intake`]: a delivery becomes a [`intake::Job`], validated;
//! - [`claim`]: the key is taken in the idempotency store, under a per-key lock ([`keylocks`]);
//! - [`call`]: the rate limiter and the Genesys call, with in-process retries;
//! - [`outcome`]: one [`outcome::Outcome`] per way a delivery ends;
//! - [`plan`]: what an outcome writes and sends, decided without effects ([`plan::Plan`]);
//! - [`finish`]: the one path that carries a plan out, in stages: persist, tell, route.
//!
//! [`permit`] is the call permit `call` takes and `finish` lets go once the answer is durable.
//! [`auth`] pauses consumption when Genesys refuses the credentials; `background` holds the
//! tasks beside the consume loop (fleet tasks that stop it, the store-failure pause, pruning). The consume loop,
//! reconnects and shutdown are the shared shell in [`crate::amqp::shell`].
//!
//! This folder may use the infrastructure (amqp, store, genesys, limiter, health, metrics,
//! internal_events, request, event, config); it knows nothing of the forwarder, the operator
//! tools or the command line.

pub mod auth;
mod background;
use background::{pause_on_store_failure, prune_loop, stop_for_good, stop_when};
pub mod call;
pub mod claim;
pub mod finish;
pub mod intake;
pub mod keylocks;
pub mod outcome;
pub mod permit;
pub mod plan;

use crate::amqp::consumer::Settle;
use crate::amqp::shell::{self, Pipeline, SharedConnection, ShellOptions};
use crate::amqp::{AmqpError, DeadLetters};
use crate::config::Settings;
use crate::fleet::budget::{Budget, BudgetTask};
use crate::fleet::reader::LedgerReader;
use crate::fleet::{Fleet, FleetError};
use crate::genesys::{GenesysClient, GenesysError};
use crate::health::Health;
use crate::limiter::Limiter;
use crate::metrics::InflightGuard;
use crate::request::ValidRequest;
use crate::shutdown::Shutdown;
use crate::store::{Store, StoreError};
use auth::AuthGate;
use call::Caller;
use claim::{ClaimError, Claimed};
use finish::{FinishError, Recorder};
use intake::{Intake, Job};
use keylocks::KeyLocks;
use lapin::message::Delivery;
use lapin::Channel;
use outcome::Outcome;
use permit::CallPermit;
use std::sync::{Arc, Mutex, OnceLock};
use tokio::sync::Notify;
use tracing::field::Empty;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error(transparent)]
    Claim(#[from] ClaimError),
    #[error(transparent)]
    Finish(#[from] FinishError),
    #[error("cannot build the Genesys Cloud client: {0}")]
    Client(#[from] GenesysError),
    #[error("this worker has run already; make a new one")]
    RanAlready,
}

pub struct Worker {
    settings: Arc<Settings>,
    worker_id: String,
    caller: Caller,
    recorder: Recorder,
    store: Store,
    locks: KeyLocks,
    health: Arc<Health>,
    auth: AuthGate,
    /// Stops the consume loop: the auth gate trips it, and so does the store when it fails.
    interrupt: Arc<Notify>,
    fleet: Arc<Fleet>,
    budget: Budget,
    /// The broker connection the worker's pipelines share.
    link: Arc<SharedConnection>,
    /// The fleet's two loops (the ledger reader, the budget), taken by [`Worker::run`].
    tasks: Mutex<Option<(LedgerReader, BudgetTask)>>,
    /// Set by `run`; calls not yet sent when it fires are abandoned.
    shutdown: OnceLock<Shutdown>,
}

impl Worker {
    /// This pod's fleet handle (the admin endpoint asks it for live claims).
    pub fn fleet(&self) -> Arc<Fleet> {
        self.fleet.clone()
    }

    pub fn new(
        settings: Arc<Settings>,
        store: Store,
        health: Arc<Health>,
    ) -> Result<Self, WorkerError> {
        let client = GenesysClient::new(&settings.genesys, settings.worker.concurrency)?;
        let limiter = Arc::new(Limiter::new(
            settings.rate_limit.requests_per_minute,
            settings.rate_limit.burst,
        ));
        health.set_store_open(true);
        let worker_id = settings.worker_id();
        // One connection for the consumer, the ledger reader and appender, and the budget
        // listener: one I/O thread instead of four.
        let link = SharedConnection::new(&settings.amqp, format!("session-worker {worker_id}"));
        let (fleet, ledger_reader) = Fleet::new(
            settings.clone(),
            store.clone(),
            health.clone(),
            link.clone(),
        );
        let (budget, budget_task) = Budget::new(settings.clone(), limiter.clone());
        let interrupt = Arc::new(Notify::new());
        let w = &settings.worker;
        Ok(Self {
            caller: Caller {
                client,
                limiter,
                calls: Arc::new(tokio::sync::Semaphore::new(w.concurrency.max(1))),
                max_attempts: w.max_attempts,
                backoff_base: w.backoff_base,
                backoff_max: w.backoff_max,
                retry_unknown: settings.genesys.retry_unknown_outcome,
                grace: w.shutdown_grace,
            },
            recorder: Recorder {
                settings: settings.clone(),
                store: store.clone(),
                worker_id: worker_id.clone(),
                dead_letters: DeadLetters {
                    exchange: settings.amqp.dead_letter_exchange.clone(),
                    queue: settings.amqp.dead_letter_queue.clone(),
                    worker_id: worker_id.clone(),
                },
                fleet: fleet.clone(),
            },
            fleet,
            budget,
            link,
            tasks: Mutex::new(Some((ledger_reader, budget_task))),
            shutdown: OnceLock::new(),
            worker_id,
            store,
            locks: KeyLocks::default(),
            health,
            auth: AuthGate::new(interrupt.clone()),
            interrupt,
            settings,
        })
    }

    /// Run the session workers until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: impl Into<Shutdown>) -> Result<(), WorkerError> {
        let s = &self.settings;
        tracing::info!(
            worker_id = %self.worker_id,
            queue = %s.amqp.inbound_queue,
            backend = self.caller.client.backend().name(),
            concurrency = s.worker.concurrency,
            requests_per_minute = s.rate_limit.requests_per_minute,
            "session worker starting"
        );
        let shutdown: Shutdown = shutdown.into();
        let _ = self.shutdown.set(shutdown.clone());
        let pruner = tokio::spawn(prune_loop(self.store.clone(), s.store.audit_retention));
        let store_watch = tokio::spawn(pause_on_store_failure(
            self.store.failures(),
            self.interrupt.clone(),
        ));
        // The ledger reader outlives the consumer, so in-flight work can still claim and
        // record while the consumer drains.
        let link = self.link.clone();
        let (stop_reader, reader_shutdown) = Shutdown::new();
        // Either fleet task gone for good stops the consumer: the process then exits with that
        // task's error and is restarted, instead of staying ready while it cannot decide a
        // claim (the reader) or holds every call because nobody hears it (the budget).
        let (gone_for_good, fatal) = tokio::sync::mpsc::channel::<()>(2);
        let (ledger_reader, budget_task) = self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or(WorkerError::RanAlready)?;
        let reader = tokio::spawn(stop_for_good(
            ledger_reader.run(reader_shutdown.clone(), Some(link.clone())),
            "the fleet ledger reader stopped for good: the worker stops too (no claim can be decided without it)",
            gone_for_good.clone(),
        ));
        let budget = tokio::spawn(stop_for_good(
            budget_task.run(reader_shutdown.clone(), Some(link.clone())),
            "the rate budget listener stopped for good: the worker stops too (it would hold every call, unheard by the other pods)",
            gone_for_good,
        ));
        let mut shutdown_or_fatal = stop_when(shutdown.clone(), fatal);
        let caught_up = self.warm_up(&mut shutdown_or_fatal).await;
        let opts = ShellOptions {
            name: format!("session-worker {}", self.worker_id),
            queue: s.amqp.inbound_queue.clone(),
            tag_prefix: self.worker_id.clone(),
            prefetch: s.amqp.prefetch,
            concurrency: deliveries_in_flight(&s.worker, s.amqp.prefetch),
            grace: s.worker.shutdown_grace,
            link: Some(link.clone()),
        };
        let result = if caught_up {
            shell::run(
                &s.amqp,
                &opts,
                self.clone(),
                &self.health,
                shutdown_or_fatal,
            )
            .await
        } else {
            Ok(())
        };
        self.budget.leave().await;
        stop_reader.fire();
        let read = reader.await;
        let listened = budget.await;
        link.close().await;
        pruner.abort();
        let _ = pruner.await;
        store_watch.abort();
        // Nothing was acked before it was durable: a store that fails now loses nothing.
        match self.store.flush_now() {
            Ok(()) => tracing::info!("session worker stopped; store flushed"),
            Err(e) => {
                tracing::error!(error = %e, "session worker stopped; the final store flush failed (nothing acked is lost: every ack waited for a durable write)")
            }
        }
        result?;
        match read {
            Ok(r) => r?,
            Err(e) => tracing::error!(error = %e, "the fleet ledger reader task failed"),
        }
        match listened {
            Ok(r) => r?,
            Err(e) => tracing::error!(error = %e, "the rate budget listener task failed"),
        }
        Ok(())
    }

    /// Before the first delivery: catch up with the fleet ledger and be heard by the other
    /// pods. False if shutdown (or a fleet task gone for good) came first.
    async fn warm_up(&self, shutdown_or_fatal: &mut Shutdown) -> bool {
        tracing::info!(
            "catching up with the fleet ledger and greeting the other pods before taking deliveries"
        );
        let mut listening = shutdown_or_fatal.clone();
        let greeting = self.budget.clone();
        let warm = async move {
            tokio::select! {
                _ = greeting.greeted() => true,
                _ = listening.requested() => false,
            }
        };
        let (caught_up, warm) = tokio::join!(self.fleet.caught_up(shutdown_or_fatal), warm);
        caught_up && warm
    }

    /// The stages, in order: intake, claim, call, finish.
    async fn process(&self, delivery: Delivery, ch: &Channel) -> Result<Settle, WorkerError> {
        let max_redeliveries = self.settings.worker.max_redeliveries;
        let limit = self.settings.genesys.custom_data_limit();
        let (mut job, valid) = match intake::accept(delivery, max_redeliveries, limit) {
            Intake::Valid(job, valid) => (job, valid),
            Intake::Poison(job, deliveries) => {
                tracing::Span::current().record("idempotency_key", job.key.as_str());
                let outcome = Outcome::Poison(deliveries);
                return Ok(self
                    .recorder
                    .finish(&job, None, outcome, None, ch, &self.shutdown())
                    .await?);
            }
            Intake::Invalid(job, err) => {
                tracing::Span::current().record("idempotency_key", job.key.as_str());
                let outcome = Outcome::Invalid(err);
                return Ok(self
                    .recorder
                    .finish(&job, None, outcome, None, ch, &self.shutdown())
                    .await?);
            }
        };
        tracing::Span::current().record("idempotency_key", job.key.as_str());
        let _guard = self.locks.lock(&job.key).await;
        let claimed =
            match claim::claim_key(&self.store, &self.fleet, &mut job, &valid, &self.worker_id)
                .await
            {
                Ok(claimed) => claimed,
                // Nothing was sent: the delivery goes back (not counted as a redelivery) while the
                // store heals.
                Err(ClaimError::Store(e)) => return Ok(self.recorder.defer(&job, ch, &e).await?),
                Err(e) => return Err(e.into()),
            };
        // Held until the answer is durable (see `Caller::permit`).
        let (outcome, permit) = match claimed {
            Claimed::Decided(outcome) => (*outcome, None),
            Claimed::Call => self.call(&mut job, &valid).await,
        };
        let auth_refused = matches!(outcome, Outcome::AuthRefused(_));
        let started = match &outcome {
            Outcome::Started(created) => Some(created.rate_limit.allowed),
            _ => None,
        };
        let shutdown = self.shutdown();
        let finishing = self
            .recorder
            .finish(&job, Some(&valid), outcome, permit, ch, &shutdown);
        let settle = Box::pin(finishing).await?;
        if auth_refused {
            self.auth.trip();
        } else if let Some(allowed) = started {
            self.auth.succeeded();
            if let Some(a) = allowed {
                self.budget.observe_allowed(a);
            }
        }
        Ok(settle)
    }
}

impl Worker {
    /// The shutdown `run` was given (a never-firing one before that).
    fn shutdown(&self) -> Shutdown {
        self.shutdown.get().cloned().unwrap_or_else(Shutdown::never)
    }

    /// The call stage, with the fleet claim renewed while it runs: a call permit, then the
    /// call. The permit comes back with the outcome, for the caller to hold while it records.
    async fn call(&self, job: &mut Job, valid: &ValidRequest) -> (Outcome, Option<CallPermit<'_>>) {
        let shutdown = self.shutdown();
        let held = job.held.clone();
        let key = job.key.clone();
        let call = async {
            match self.caller.permit(&shutdown).await {
                Some(permit) => (self.caller.call(job, valid, &shutdown).await, Some(permit)),
                None => (Outcome::Abandoned, None),
            }
        };
        let Some(held) = held else {
            return call.await;
        };
        let mut tick = tokio::time::interval(self.fleet.renew_every());
        tick.tick().await;
        tokio::pin!(call);
        loop {
            tokio::select! {
                outcome = &mut call => return outcome,
                _ = tick.tick() => {
                    if let Err(e) = self.fleet.renew(&key, &held).await {
                        tracing::warn!(error = %e, "could not renew the fleet claim");
                    }
                }
            }
        }
    }
}

impl Pipeline for Worker {
    const NAME: &'static str = "worker";
    type Error = WorkerError;

    fn span(&self, delivery: &Delivery) -> tracing::Span {
        tracing::info_span!(
            "message",
            delivery_tag = delivery.delivery_tag,
            idempotency_key = Empty,
            conversation_id = Empty,
            correlation_id = Empty
        )
    }

    async fn handle(
        self: Arc<Self>,
        delivery: Delivery,
        publish: Channel,
    ) -> Result<Settle, WorkerError> {
        let _inflight = InflightGuard::new();
        self.process(delivery, &publish).await
    }

    fn interrupt(&self) -> Option<&Notify> {
        Some(&self.interrupt)
    }

    /// Paused for a failing store (until it takes writes again), then for refused credentials
    /// (until the token endpoint accepts them).
    async fn resume(&self, shutdown: &mut Shutdown) -> bool {
        if self.store.failure().is_some() && !self.store.writable(shutdown).await {
            return false;
        }
        if self.auth.tripped() {
            return self
                .auth
                .pause(&self.caller.client, &self.health, shutdown)
                .await;
        }
        true
    }
}

/// How many deliveries the consumer works on at once. `worker.concurrency` bounds the Genesys
/// calls ([`Caller::calls`]); a delivery also spends time before its call (the fleet claim's
/// round trip through the ledger), and those waits overlap the calls of others. Half as many
/// again as the calls keeps every call permit busy while claims are on their way (measured:
/// the same throughput as twice as many, with ~3 MiB less memory per 32 deliveries in hand,
/// docs/performance.md), and never more than the broker hands over (`amqp.prefetch`). At
/// concurrency 1 the pod works on one delivery at a time, so deliveries are handled in queue
/// order.
pub fn deliveries_in_flight(worker: &crate::config::WorkerSettings, prefetch: u16) -> usize {
    match worker.concurrency {
        0 | 1 => 1,
        n => (n + n / 2).min(usize::from(prefetch)).max(n),
    }
}

#[cfg(test)]
mod tests;
