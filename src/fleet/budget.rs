//! The fleet's one rate budget (SPEC §9): `rate_limit.requests_per_minute` is the whole
//! deployment's, and each live pod takes an equal share of it.
//!
//! Every pod sends a heartbeat each [`HEARTBEAT`] through the fanout exchange
//! `amqp.fleet_exchange` and hears everybody's on an exclusive queue of its own. A pod counts
//! the pods heard within [`PEER_EXPIRY`] (itself included) and sets its limiter to
//! `budget ÷ live pods`; a pod that shuts down says so and its share returns at once, a pod that
//! dies is forgotten after [`PEER_EXPIRY`]. A starting pod says hello and every live pod
//! answers at once, so it knows its share within [`ANSWER_WAIT`] instead of a few heartbeats;
//! until then it counts at least one other pod, so it never starts with the whole budget.
//! The share is also never above what Genesys Cloud says this pod's token may use
//! (`inin-ratelimit-allowed`).
//!
//! A pod spends only while the others can hear it, which it knows by hearing its own
//! heartbeats come back through the exchange: until it hears its hello, and whenever it has
//! not heard itself for [`MUTE_AFTER`] (its channel was closed, its queue lost its binding, the
//! broker does not confirm), its limiter holds every call and its listener connects again —
//! the others forget it after [`PEER_EXPIRY`] and take its share, and both spending it would
//! overspend the budget.

use super::Fleet;
use crate::amqp::consumer::Settle;
use crate::amqp::shell::{self, Pipeline, ShellOptions};
use crate::amqp::{self, AmqpError};
use crate::limiter::Limiter;
use crate::metrics::metrics;
use crate::shutdown::Shutdown;
use lapin::message::Delivery;
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often a pod says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A pod not heard from for this long no longer counts.
pub const PEER_EXPIRY: Duration = Duration::from_secs(5);
/// How long after its hello a starting pod counts at least one other pod: every live pod
/// answers a hello at once, so it does not start with the whole budget while others already
/// spend theirs (it takes deliveries meanwhile; its share is at most half the budget). An
/// answer that comes later still shrinks the share the moment it arrives.
pub const ANSWER_WAIT: Duration = Duration::from_millis(200);
/// The longest a starting pod listens (its hello could not be sent: the broker is slow).
pub const WARM_UP: Duration = Duration::from_millis(2_500);
/// A pod that has not heard its own heartbeat come back through the fleet exchange for this
/// long holds its calls: if it cannot hear itself, the others cannot hear it either, and they
/// forget a pod unheard for [`PEER_EXPIRY`] and take its share, so it must stop spending first.
/// It also connects its listener again (declaring the exchange and binding its queue anew:
/// an exchange deleted and declared again has lost every binding). It spends again once it
/// hears itself. A starting pod is held until it hears its own hello.
pub const MUTE_AFTER: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Heartbeat {
    worker_id: String,
    instance: String,
    leaving: bool,
    /// A starting pod: every other pod answers with its heartbeat at once. (Pods of earlier
    /// versions ignore it and are heard at their next heartbeat.)
    #[serde(default)]
    hello: bool,
}

pub struct Budget {
    fleet: Arc<Fleet>,
    limiter: Arc<Limiter>,
    /// This process (a restarted pod keeps its worker id but is a new instance).
    instance: String,
    peers: Mutex<HashMap<String, Instant>>,
    publish: Mutex<Option<Channel>>,
    /// Last `inin-ratelimit-allowed` from Genesys Cloud (0: none seen).
    allowed: AtomicU64,
    /// Set once this pod's hello is out.
    greeted: watch::Sender<bool>,
    /// Until when the answers to this pod's first hello may still come.
    answers_due: Mutex<Option<Instant>>,
    /// This budget itself, for the task that takes the share once the answers are in.
    me: std::sync::Weak<Budget>,
    /// Since when this pod hears heartbeats (`None` while disconnected).
    hearing_since: Mutex<Option<Instant>>,
    /// When this pod last heard its own heartbeat back through the fleet exchange (`None`:
    /// never yet).
    echoed_at: Mutex<Option<Instant>>,
    /// Fired when the publishing channel is found closed: the listener connects again.
    lost: tokio::sync::Notify,
}

impl Budget {
    pub fn new(fleet: Arc<Fleet>, limiter: Arc<Limiter>) -> Arc<Self> {
        let instance = uuid::Uuid::new_v4().simple().to_string();
        let mut peers = HashMap::new();
        peers.insert(instance.clone(), Instant::now());
        // Nobody has heard this pod yet: no call until it hears its own hello come back.
        limiter.hold(true);
        crate::internal_events::budget_held(None);
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            fleet,
            limiter,
            instance,
            peers: Mutex::new(peers),
            publish: Mutex::new(None),
            allowed: AtomicU64::new(0),
            greeted: watch::channel(false).0,
            answers_due: Mutex::new(None),
            hearing_since: Mutex::new(None),
            echoed_at: Mutex::new(None),
            lost: tokio::sync::Notify::new(),
        })
    }

    /// Wait until this pod's hello is out (at most [`WARM_UP`]): the others are answering,
    /// and until their answers are in its share counts at least one of them.
    pub async fn greeted(&self) {
        let mut greeted = self.greeted.subscribe();
        let _ = tokio::time::timeout(WARM_UP, greeted.wait_for(|g| *g)).await;
    }

    /// Listen and send heartbeats until `shutdown`; then say goodbye.
    pub async fn run(
        self: Arc<Self>,
        shutdown: Shutdown,
        link: Option<Arc<shell::SharedConnection>>,
    ) -> Result<(), AmqpError> {
        let s = self.fleet.settings.clone();
        let opts = ShellOptions {
            name: format!("session-worker budget {}", self.fleet.worker_id),
            queue: self.queue_name(),
            tag_prefix: format!("{}-budget", self.fleet.worker_id),
            prefetch: 64,
            concurrency: 1,
            grace: Duration::from_secs(1),
            link,
        };
        let beat = tokio::spawn(self.clone().beat(shutdown.clone()));
        let health = Arc::new(crate::health::Health::default());
        let result = shell::run(&s.amqp, &opts, self.clone(), &health, shutdown).await;
        if result.is_err() {
            // Gone for good: nobody will hear the heartbeats, and the worker stops.
            beat.abort();
        }
        let _ = beat.await;
        result
    }

    /// Tell the others this pod is leaving, so they take its share back at once.
    pub async fn leave(&self) {
        self.send(Say::Leaving).await;
    }

    /// What Genesys Cloud says this pod's token may use per minute.
    pub fn observe_allowed(&self, allowed: u64) {
        if self.allowed.swap(allowed, Ordering::Relaxed) != allowed {
            self.apply();
        }
    }

    /// The pods heard from lately, this one included. A pod is forgotten only once this one
    /// has been listening [`PEER_EXPIRY`] without hearing it: while this pod's own connection
    /// is down it hears nobody, and taking the whole budget then (its calls in flight go on)
    /// would overspend the fleet's.
    pub fn live_pods(&self) -> usize {
        let hearing = *self.hearing_since.lock().unwrap_or_else(|p| p.into_inner());
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.insert(self.instance.clone(), Instant::now());
        peers.retain(|_, seen| !expired(*seen, hearing));
        peers.len()
    }

    /// Set the limiter to this pod's share.
    fn apply(&self) {
        let live = self.live_pods();
        let due = *self.answers_due.lock().unwrap_or_else(|p| p.into_inner());
        let r = &self.fleet.settings.rate_limit;
        let (rpm, burst) = share(
            r.requests_per_minute,
            r.burst,
            counted(live, due.is_some_and(|t| Instant::now() < t)),
            self.allowed.load(Ordering::Relaxed),
        );
        if self.limiter.rate() != (rpm, burst) {
            tracing::info!(
                live_pods = live,
                requests_per_minute = rpm,
                burst,
                "rate budget share changed"
            );
        }
        self.limiter.set_rate(rpm, burst);
        metrics().fleet_live_pods.set(live as i64);
        metrics().rate_limit_share.set(i64::from(rpm));
    }

    async fn beat(self: Arc<Self>, mut shutdown: Shutdown) {
        let mut tick = tokio::time::interval(HEARTBEAT);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.requested() => return,
            }
            // Bounded: a broker that never confirms must not stop the check below.
            let _ = tokio::time::timeout(HEARTBEAT, self.send(Say::Alive)).await;
            self.check_heard();
            self.apply();
        }
    }

    /// Send a heartbeat; whether the broker took it.
    async fn send(&self, say: Say) -> bool {
        let ch = self
            .publish
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(ch) = ch else { return false };
        let beat = Heartbeat {
            worker_id: self.fleet.worker_id.clone(),
            instance: self.instance.clone(),
            leaving: say == Say::Leaving,
            hello: say == Say::Hello,
        };
        let body = serde_json::to_vec(&beat).unwrap_or_default();
        let props = amqp::json_properties().with_delivery_mode(1);
        let exchange = &self.fleet.settings.amqp.fleet_exchange;
        match amqp::publish_confirmed(&ch, exchange, "", &body, props).await {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, "heartbeat not sent");
                if !ch.status().connected() {
                    // The broker closed the channel (the fleet exchange is gone, say): connect
                    // again, which declares the exchange and this pod's queue anew.
                    self.lost.notify_one();
                }
                false
            }
        }
    }

    /// This pod heard its own heartbeat back through the fleet exchange: the others hear it
    /// too, so it may spend.
    fn echoed(&self) {
        *self.echoed_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        if self.limiter.hold(false) {
            crate::internal_events::budget_heard();
        }
    }

    /// Hold calls if this pod has not heard itself for [`MUTE_AFTER`]; and if it has been
    /// connected that long, connect the listener again (its queue may have lost its binding).
    fn check_heard(self: &Arc<Self>) {
        let echoed = *self.echoed_at.lock().unwrap_or_else(|p| p.into_inner());
        if !muted(echoed) {
            return;
        }
        if self.limiter.hold(true) {
            crate::internal_events::budget_held(echoed.map(|t| t.elapsed()));
        }
        let hearing = *self.hearing_since.lock().unwrap_or_else(|p| p.into_inner());
        if hearing.is_some_and(|since| since.elapsed() >= MUTE_AFTER) {
            self.reconnect();
        }
    }

    /// Connect the listener again: its publishing channel is closed, so the shell connects the
    /// pipeline anew (declaring the exchange, this pod's queue and its binding).
    fn reconnect(self: &Arc<Self>) {
        let ch = self
            .publish
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let me = self.clone();
        tokio::spawn(async move {
            if let Some(ch) = ch {
                let _ = ch
                    .close(200, "not hearing itself: connecting again".into())
                    .await;
            }
            me.lost.notify_one();
        });
    }

    fn queue_name(&self) -> String {
        format!(
            "{}.{}.{}",
            self.fleet.settings.amqp.fleet_exchange, self.fleet.worker_id, self.instance
        )
    }
}

/// Whether a pod last heard at `seen` no longer counts, for a listener hearing since
/// `hearing` (`None`: not connected, so silence proves nothing).
fn expired(seen: Instant, hearing: Option<Instant>) -> bool {
    match hearing {
        Some(since) => seen.elapsed() >= PEER_EXPIRY && since.elapsed() >= PEER_EXPIRY,
        None => false,
    }
}

/// The pods a share is computed for: the `live` ones heard, and while the answers to this
/// pod's hello may still come, at least one more than itself.
fn counted(live: usize, answers_pending: bool) -> usize {
    if answers_pending {
        live.max(2)
    } else {
        live
    }
}

/// Whether a pod that last heard itself at `echoed` (`None`: never) must hold its calls.
fn muted(echoed: Option<Instant>) -> bool {
    echoed.is_none_or(|t| t.elapsed() >= MUTE_AFTER)
}

/// What a heartbeat says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Say {
    Alive,
    Hello,
    Leaving,
}

/// A pod's share: the budget divided among the live pods (at least 1 per minute), capped by
/// Genesys Cloud's `inin-ratelimit-allowed` when one was seen; the burst likewise.
pub fn share(budget: u32, burst: u32, live: usize, allowed: u64) -> (u32, u32) {
    let live = u32::try_from(live.max(1)).unwrap_or(u32::MAX);
    let mut rpm = (budget / live).max(1);
    if allowed > 0 {
        rpm = rpm.min(u32::try_from(allowed).unwrap_or(u32::MAX));
    }
    let burst = burst.div_ceil(live).clamp(1, rpm);
    (rpm, burst)
}

impl Pipeline for Budget {
    const NAME: &'static str = "budget";
    type Error = Infallible;

    fn span(&self, _delivery: &Delivery) -> tracing::Span {
        tracing::trace_span!("heartbeat")
    }

    async fn handle(
        self: Arc<Self>,
        delivery: Delivery,
        _publish: Channel,
    ) -> Result<Settle, Infallible> {
        if let Ok(beat) = serde_json::from_slice::<Heartbeat>(&delivery.data) {
            let stranger = beat.hello && beat.instance != self.instance;
            if beat.instance == self.instance && !beat.leaving {
                self.echoed();
            }
            let changed = {
                let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
                if beat.leaving {
                    peers.remove(&beat.instance).is_some()
                } else {
                    peers.insert(beat.instance, Instant::now()).is_none()
                }
            };
            // A pod arriving or leaving changes every share now, not at the next tick.
            if changed {
                self.apply();
            }
            if stranger {
                // Not awaited here: a broker slow to confirm must not stop this pod hearing.
                let me = self.clone();
                tokio::spawn(async move { me.send(Say::Alive).await });
            }
        }
        Ok(Settle::Ack)
    }

    fn interrupt(&self) -> Option<&tokio::sync::Notify> {
        Some(&self.lost)
    }

    async fn connected(&self, _conn: &Connection, publish: &Channel) -> Result<(), AmqpError> {
        let queue = self.queue_name();
        publish
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                amqp::table(vec![("x-queue-type", amqp::text("classic"))]),
            )
            .await
            .map_err(|e| AmqpError::op(format!("declare queue {queue}"), e))?;
        publish
            .queue_bind(
                queue.as_str().into(),
                self.fleet.settings.amqp.fleet_exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| AmqpError::op(format!("bind {queue}"), e))?;
        *self.publish.lock().unwrap_or_else(|p| p.into_inner()) = Some(publish.clone());
        *self.hearing_since.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        // Say hello at once: the others count this pod and answer, so it knows them before
        // it starts consuming.
        if self.send(Say::Hello).await && !*self.greeted.borrow() {
            // The first hello: count at least one other pod until the answers are in, then
            // take the share of those heard. The share is set before the worker, waiting for
            // `greeted`, takes its first delivery.
            *self.answers_due.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(Instant::now() + ANSWER_WAIT);
            self.apply();
            let me = self.me.clone();
            tokio::spawn(async move {
                tokio::time::sleep(ANSWER_WAIT).await;
                if let Some(me) = me.upgrade() {
                    me.apply();
                }
            });
            self.greeted.send_replace(true);
        }
        Ok(())
    }

    fn disconnected(&self) {
        *self.publish.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self.hearing_since.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_is_forgotten_only_after_being_unheard_while_this_one_listens() {
        let now = Instant::now();
        let Some(long_ago) = now.checked_sub(PEER_EXPIRY * 2) else {
            return;
        };
        // Listening all along: silence for the expiry means gone.
        assert!(expired(long_ago, Some(long_ago)));
        assert!(!expired(now, Some(long_ago)));
        // Disconnected, or reconnected just now: silence proves nothing yet.
        assert!(!expired(long_ago, None));
        assert!(!expired(long_ago, Some(now)));
    }

    #[test]
    fn a_starting_pod_counts_another_pod_until_the_answers_to_its_hello_are_in() {
        assert_eq!(
            counted(1, true),
            2,
            "alone, as far as it knows yet: half at most"
        );
        assert_eq!(counted(3, true), 3, "the answers heard count as they come");
        assert_eq!(counted(1, false), 1, "no answer came: the whole budget");
        assert_eq!(share(600, 10, counted(1, true), 0), (300, 5));
    }

    #[test]
    fn a_pod_whose_heartbeats_do_not_get_out_holds_its_calls_before_the_others_forget_it() {
        const { assert!(MUTE_AFTER.as_millis() + 2 * HEARTBEAT.as_millis() <= PEER_EXPIRY.as_millis()) };
        assert!(muted(None), "never heard: held");
        assert!(!muted(Some(Instant::now())));
        if let Some(then) = Instant::now().checked_sub(MUTE_AFTER) {
            assert!(muted(Some(then)));
        }
    }

    #[test]
    fn the_budget_is_shared_among_live_pods_and_capped_by_genesys() {
        assert_eq!(share(600, 30, 1, 0), (600, 30));
        assert_eq!(share(600, 30, 3, 0), (200, 10));
        assert_eq!(share(600, 30, 4, 0), (150, 8));
        // Genesys says this token may use 100 a minute: never above it.
        assert_eq!(share(600, 30, 1, 100), (100, 30));
        assert_eq!(share(2, 10, 5, 0), (1, 1));
    }
}
