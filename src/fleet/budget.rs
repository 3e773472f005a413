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
//!
//! The shape: [`Budget`] is the worker's handle (what Genesys allows, leaving, waiting to be
//! heard); [`BudgetTask`] is one loop that owns every peer, timer and channel and handles one
//! event at a time; [`listener`] is the shell pipeline that hears heartbeats for it.

mod listener;

use crate::amqp::shell::{self, SharedConnection, ShellOptions};
use crate::amqp::AmqpError;
use crate::config::Settings;
use crate::limiter::Limiter;
use crate::metrics::metrics;
use crate::shutdown::Shutdown;
use lapin::Channel;
use listener::{Listener, Voice};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch, Notify};

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

/// The worker's handle on the budget loop.
#[derive(Clone)]
pub struct Budget {
    commands: mpsc::UnboundedSender<Command>,
    greeted: watch::Receiver<bool>,
}

enum Command {
    /// Genesys Cloud's `inin-ratelimit-allowed` for this pod's token.
    Allowed(u64),
    /// Say goodbye, then answer.
    Leave(oneshot::Sender<()>),
}

/// What the listener tells the loop, in the order it happened.
enum Heard {
    /// Connected (queue declared and bound); whether the hello went out.
    Connected {
        publish: Channel,
        hello_sent: bool,
    },
    Beat(Heartbeat),
    Disconnected,
}

impl Budget {
    /// The handle, and the loop to run (it needs the deployment's budget, the worker id and
    /// the limiter it sets). Until the loop hears this pod's own hello come back, the
    /// limiter holds every call: nobody has heard this pod yet.
    pub fn new(settings: Arc<Settings>, limiter: Arc<Limiter>) -> (Self, BudgetTask) {
        limiter.hold(true);
        crate::internal_events::budget_held(None);
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (greeted_tx, greeted) = watch::channel(false);
        let task = BudgetTask {
            settings,
            limiter,
            commands: commands_rx,
            greeted: greeted_tx,
        };
        (Self { commands, greeted }, task)
    }

    /// Wait until this pod's hello is out (at most [`WARM_UP`]): the others are answering,
    /// and until their answers are in its share counts at least one of them.
    pub async fn greeted(&self) {
        let mut greeted = self.greeted.clone();
        let _ = tokio::time::timeout(WARM_UP, greeted.wait_for(|g| *g)).await;
    }

    /// What Genesys Cloud says this pod's token may use per minute.
    pub fn observe_allowed(&self, allowed: u64) {
        let _ = self.commands.send(Command::Allowed(allowed));
    }

    /// Tell the others this pod is leaving, so they take its share back at once.
    pub async fn leave(&self) {
        let (done, said) = oneshot::channel();
        if self.commands.send(Command::Leave(done)).is_ok() {
            let _ = said.await;
        }
    }
}

/// The budget loop: everything it knows is its own.
pub struct BudgetTask {
    settings: Arc<Settings>,
    limiter: Arc<Limiter>,
    commands: mpsc::UnboundedReceiver<Command>,
    greeted: watch::Sender<bool>,
}

/// What the loop knows while it runs.
struct Peers {
    voice: Voice,
    /// Pods heard, by instance, and when.
    seen: HashMap<String, Instant>,
    /// The channel heartbeats go out on (`None` while disconnected).
    publish: Option<Channel>,
    /// Last `inin-ratelimit-allowed` from Genesys Cloud (0: none seen).
    allowed: u64,
    /// Until when the answers to this pod's first hello may still come.
    answers_due: Option<Instant>,
    /// Since when this pod hears heartbeats (`None` while disconnected).
    hearing_since: Option<Instant>,
    /// When this pod last heard its own heartbeat back (`None`: never yet).
    echoed_at: Option<Instant>,
}

impl BudgetTask {
    /// Listen and send heartbeats until `shutdown`, saying goodbye when asked.
    pub async fn run(
        mut self,
        shutdown: Shutdown,
        link: Option<Arc<SharedConnection>>,
    ) -> Result<(), AmqpError> {
        let worker_id = self.settings.worker_id();
        let voice = Voice {
            exchange: self.settings.amqp.fleet_exchange.clone(),
            worker_id: worker_id.clone(),
            instance: uuid::Uuid::new_v4().simple().to_string(),
            lost: Arc::new(Notify::new()),
        };
        let (heard_tx, mut heard) = mpsc::unbounded_channel();
        let opts = ShellOptions {
            name: format!("session-worker budget {worker_id}"),
            queue: voice.queue(),
            tag_prefix: format!("{worker_id}-budget"),
            prefetch: 64,
            concurrency: 1,
            grace: Duration::from_secs(1),
            link,
        };
        let listener = Arc::new(Listener {
            voice: voice.clone(),
            heard: heard_tx,
        });
        let amqp_settings = self.settings.amqp.clone();
        let mut listening = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                let health = crate::health::Health::default();
                shell::run(&amqp_settings, &opts, listener, &health, shutdown).await
            }
        });
        let mut peers = Peers::new(voice);
        let mut tick = tokio::time::interval(HEARTBEAT);
        let mut beating = shutdown.clone();
        let mut stopping = false;
        loop {
            let answers_due = peers.answers_due;
            tokio::select! {
                ended = &mut listening => {
                    return ended.unwrap_or_else(|e| Err(AmqpError::op("the budget listener", e)));
                }
                _ = tick.tick(), if !stopping => peers.beat(&self),
                _ = beating.requested(), if !stopping => stopping = true,
                Some(event) = heard.recv() => peers.hear(event, &self),
                Some(command) = self.commands.recv() => match command {
                    Command::Allowed(a) => peers.allowed(a, &self),
                    Command::Leave(done) => {
                        peers.leave().await;
                        let _ = done.send(());
                    }
                },
                _ = sleep_until(answers_due), if answers_due.is_some() => {
                    peers.answers_due = None;
                    peers.apply(&self);
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at.into()).await;
    }
}

impl Peers {
    fn new(voice: Voice) -> Self {
        let mut seen = HashMap::new();
        seen.insert(voice.instance.clone(), Instant::now());
        Self {
            voice,
            seen,
            publish: None,
            allowed: 0,
            answers_due: None,
            hearing_since: None,
            echoed_at: None,
        }
    }

    /// Each [`HEARTBEAT`]: say this pod is alive, hold its calls if it has not heard itself,
    /// and set its share.
    fn beat(&mut self, task: &BudgetTask) {
        self.say(Say::Alive);
        self.check_heard(task);
        self.apply(task);
    }

    /// Send a heartbeat without waiting for the broker's confirm (bounded, so a broker that
    /// never confirms leaves no task behind).
    fn say(&self, say: Say) {
        if let Some(ch) = self.publish.clone() {
            let voice = self.voice.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(HEARTBEAT, voice.send(&ch, say)).await;
            });
        }
    }

    async fn leave(&self) {
        if let Some(ch) = &self.publish {
            let _ = tokio::time::timeout(HEARTBEAT, self.voice.send(ch, Say::Leaving)).await;
        }
    }

    fn hear(&mut self, event: Heard, task: &BudgetTask) {
        match event {
            Heard::Connected {
                publish,
                hello_sent,
            } => {
                self.publish = Some(publish);
                self.hearing_since = Some(Instant::now());
                if hello_sent && !*task.greeted.borrow() {
                    // The first hello: count at least one other pod until the answers are in,
                    // then take the share of those heard. The share is set before the worker,
                    // waiting for `greeted`, takes its first delivery.
                    self.answers_due = Some(Instant::now() + ANSWER_WAIT);
                    self.apply(task);
                    task.greeted.send_replace(true);
                }
            }
            Heard::Disconnected => {
                self.publish = None;
                self.hearing_since = None;
            }
            Heard::Beat(beat) => self.heartbeat(beat, task),
        }
    }

    fn heartbeat(&mut self, beat: Heartbeat, task: &BudgetTask) {
        let mine = beat.instance == self.voice.instance;
        if mine && !beat.leaving {
            // Heard back through the fleet exchange: the others hear it too, so it may spend.
            self.echoed_at = Some(Instant::now());
            if task.limiter.hold(false) {
                crate::internal_events::budget_heard();
            }
        }
        let stranger = beat.hello && !mine;
        let changed = if beat.leaving {
            self.seen.remove(&beat.instance).is_some()
        } else {
            self.seen.insert(beat.instance, Instant::now()).is_none()
        };
        // A pod arriving or leaving changes every share now, not at the next tick.
        if changed {
            self.apply(task);
        }
        if stranger {
            self.say(Say::Alive);
        }
    }

    fn allowed(&mut self, allowed: u64, task: &BudgetTask) {
        if std::mem::replace(&mut self.allowed, allowed) != allowed {
            self.apply(task);
        }
    }

    /// The pods heard from lately, this one included. A pod is forgotten only once this one
    /// has been listening [`PEER_EXPIRY`] without hearing it: while this pod's own connection
    /// is down it hears nobody, and taking the whole budget then (its calls in flight go on)
    /// would overspend the fleet's.
    fn live_pods(&mut self) -> usize {
        let hearing = self.hearing_since;
        self.seen
            .insert(self.voice.instance.clone(), Instant::now());
        self.seen.retain(|_, seen| !expired(*seen, hearing));
        self.seen.len()
    }

    /// Set the limiter to this pod's share.
    fn apply(&mut self, task: &BudgetTask) {
        let live = self.live_pods();
        let r = &task.settings.rate_limit;
        let pending = self.answers_due.is_some_and(|t| Instant::now() < t);
        let (rpm, burst) = share(
            r.requests_per_minute,
            r.burst,
            counted(live, pending),
            self.allowed,
        );
        if task.limiter.rate() != (rpm, burst) {
            tracing::info!(
                live_pods = live,
                requests_per_minute = rpm,
                burst,
                "rate budget share changed"
            );
        }
        task.limiter.set_rate(rpm, burst);
        metrics().fleet_live_pods.set(live as i64);
        metrics().rate_limit_share.set(i64::from(rpm));
    }

    /// Hold calls if this pod has not heard itself for [`MUTE_AFTER`]; and if it has been
    /// connected that long, connect the listener again (its queue may have lost its binding):
    /// closing the publishing channel makes the shell connect the pipeline anew.
    fn check_heard(&mut self, task: &BudgetTask) {
        if !muted(self.echoed_at) {
            return;
        }
        if task.limiter.hold(true) {
            crate::internal_events::budget_held(self.echoed_at.map(|t| t.elapsed()));
        }
        if self
            .hearing_since
            .is_some_and(|since| since.elapsed() >= MUTE_AFTER)
        {
            let ch = self.publish.take();
            let lost = self.voice.lost.clone();
            tokio::spawn(async move {
                if let Some(ch) = ch {
                    let _ = ch
                        .close(200, "not hearing itself: connecting again".into())
                        .await;
                }
                lost.notify_one();
            });
        }
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
