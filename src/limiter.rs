//! One token bucket per process, shared by every consumer task, plus the adaptive pause:
//! a 429 from Genesys stops every task until its `Retry-After` has passed.
//!
//! After a pause, tasks come back through the bucket with a little jitter, so the resumed
//! traffic is spread out rather than a thundering herd.
//!
//! The rate can change while the process runs ([`Limiter::set_rate`]): the fleet's budget
//! ([`crate::fleet::budget`]) gives each live pod its share of the deployment's one budget.

use governor::{Jitter, Quota, RateLimiter};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::time::Instant;

type Bucket = governor::DefaultDirectRateLimiter;

pub struct Limiter {
    /// The bucket in force and the (requests per minute, burst) it was built for.
    bucket: RwLock<(Arc<Bucket>, (u32, u32))>,
    /// Until when every task waits, set by a 429.
    paused_until: Mutex<Option<Instant>>,
    /// Spread of the jitter applied to tasks resuming after a pause.
    resume_jitter: Mutex<Duration>,
    /// Set while the other pods cannot hear this one ([`crate::fleet::budget`]): they will
    /// count it gone and take its share, so it hands out no token until it is heard again.
    held: tokio::sync::watch::Sender<bool>,
    /// Bumped by every change of rate: tasks waiting on the old bucket move to the new one
    /// (left there, they would drain it at the old rate beside the new bucket's tokens).
    rate_changes: tokio::sync::watch::Sender<u64>,
}

fn bucket(requests_per_minute: u32, burst: u32) -> (Arc<Bucket>, Duration) {
    let rpm = NonZeroU32::new(requests_per_minute).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    let quota = Quota::per_minute(rpm).allow_burst(burst);
    // One token's worth of time, so resumed tasks spread over roughly one refill step.
    let per_token = Duration::from_secs(60) / rpm.get();
    (
        Arc::new(RateLimiter::direct(quota)),
        per_token.clamp(Duration::from_millis(10), Duration::from_secs(1)),
    )
}

impl Limiter {
    /// `requests_per_minute` and `burst` must be above zero (config validation ensures it).
    pub fn new(requests_per_minute: u32, burst: u32) -> Self {
        let (b, jitter) = bucket(requests_per_minute, burst);
        Self {
            bucket: RwLock::new((b, (requests_per_minute, burst))),
            paused_until: Mutex::new(None),
            resume_jitter: Mutex::new(jitter),
            held: tokio::sync::watch::channel(false).0,
            rate_changes: tokio::sync::watch::channel(0).0,
        }
    }

    /// Hold every token (or release the hold); whether this changed anything.
    pub fn hold(&self, held: bool) -> bool {
        self.held
            .send_if_modified(|h| std::mem::replace(h, held) != held)
    }

    /// Whether tokens are held.
    pub fn is_held(&self) -> bool {
        *self.held.borrow()
    }

    /// Change the rate. A new bucket starts with only one token, so a change never lets a
    /// burst through; an unchanged rate keeps the bucket as it is.
    pub fn set_rate(&self, requests_per_minute: u32, burst: u32) {
        let mut guard = self.bucket.write().unwrap_or_else(|p| p.into_inner());
        if guard.1 == (requests_per_minute, burst) {
            return;
        }
        let (b, jitter) = bucket(requests_per_minute, burst);
        // Spend the new bucket's burst, so the switch cannot add requests on top of the old one.
        let burst_n = NonZeroU32::new(burst.saturating_sub(1)).unwrap_or(NonZeroU32::MIN);
        if burst > 1 {
            let _ = b.check_n(burst_n);
        }
        *guard = (b, (requests_per_minute, burst));
        *self.resume_jitter.lock().unwrap_or_else(|p| p.into_inner()) = jitter;
        drop(guard);
        self.rate_changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The rate in force (requests per minute, burst).
    pub fn rate(&self) -> (u32, u32) {
        self.bucket.read().unwrap_or_else(|p| p.into_inner()).1
    }

    fn current(&self) -> Arc<Bucket> {
        self.bucket
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    fn pause_deadline(&self) -> Option<Instant> {
        let guard = self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        (*guard).filter(|t| *t > Instant::now())
    }

    /// Pause every task of the process for `delay` (extends, never shortens, a pause).
    pub fn pause_for(&self, delay: Duration) {
        let until = Instant::now() + delay;
        let mut guard = self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none_or(|t| t < until) {
            *guard = Some(until);
        }
    }

    /// Whether a 429 pause is in force.
    pub fn is_paused(&self) -> bool {
        self.pause_deadline().is_some()
    }

    /// Wait for a pause to end and for a token; returns how long this took.
    pub async fn acquire(&self) -> Duration {
        let started = Instant::now();
        let mut resumed = false;
        loop {
            if self.is_held() {
                let mut released = self.held.subscribe();
                let _ = released.wait_for(|h| !*h).await;
                continue;
            }
            if let Some(until) = self.pause_deadline() {
                tokio::time::sleep_until(until).await;
                resumed = true;
                continue;
            }
            // Subscribed before the bucket is read, so a change in between is seen.
            let mut changed = self.rate_changes.subscribe();
            let bucket = self.current();
            let jitter =
                resumed.then(|| *self.resume_jitter.lock().unwrap_or_else(|p| p.into_inner()));
            let token = async {
                match jitter {
                    Some(j) => bucket.until_ready_with_jitter(Jitter::up_to(j)).await,
                    None => bucket.until_ready().await,
                }
            };
            tokio::select! {
                _ = token => {}
                // The rate changed meanwhile: wait on the new bucket instead.
                _ = changed.changed() => continue,
            }
            // A 429 (or a hold) may have arrived while this task waited for its token.
            if self.pause_deadline().is_none() && !self.is_held() {
                return started.elapsed();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_held_limiter_hands_out_no_token_until_released() {
        let l = Arc::new(Limiter::new(60_000, 10));
        assert!(l.hold(true));
        assert!(!l.hold(true), "holding twice changes nothing");
        let waiting = tokio::spawn({
            let l = l.clone();
            async move { l.acquire().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "a token was handed out while held");
        assert!(l.hold(false));
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("released: the token comes")
            .expect("task");
    }

    #[tokio::test]
    async fn burst_then_the_bucket_is_empty() {
        let l = Limiter::new(600, 3); // one token per 100 ms
        for _ in 0..3 {
            l.acquire().await;
        }
        // The burst is spent: the next token is not available yet, and waiting for it takes
        // (at least most of) one refill step.
        assert!(l.current().check().is_err());
        let waited = l.acquire().await;
        assert!(waited >= Duration::from_millis(50), "{waited:?}");
    }

    #[tokio::test]
    async fn pause_holds_every_caller() {
        let l = std::sync::Arc::new(Limiter::new(60_000, 100));
        l.pause_for(Duration::from_millis(200));
        assert!(l.is_paused());
        let t = std::time::Instant::now();
        let a = tokio::spawn({
            let l = l.clone();
            async move { l.acquire().await }
        });
        let b = tokio::spawn({
            let l = l.clone();
            async move { l.acquire().await }
        });
        let (wa, wb) = (a.await.unwrap(), b.await.unwrap());
        assert!(t.elapsed() >= Duration::from_millis(190));
        assert!(wa >= Duration::from_millis(190) && wb >= Duration::from_millis(190));
        assert!(!l.is_paused());
    }

    #[tokio::test]
    async fn a_new_rate_applies_without_a_burst() {
        let l = Limiter::new(60_000, 100);
        l.set_rate(600, 10);
        assert_eq!(l.rate(), (600, 10));
        // The switch spent the new burst but one token.
        l.acquire().await;
        assert!(l.current().check().is_err());
    }

    #[tokio::test]
    async fn tasks_waiting_when_the_rate_changes_wait_on_the_new_rate() {
        // One token a second: three waiters would take three seconds at this rate.
        let l = Arc::new(Limiter::new(60, 1));
        l.acquire().await;
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let l = l.clone();
                tokio::spawn(async move { l.acquire().await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // A much lower rate: one token a minute. Left on the old bucket, the waiters would
        // still get their tokens within three seconds.
        l.set_rate(1, 1);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut served = 0;
        for w in waiters {
            if tokio::time::timeout(Duration::from_millis(2_500), w)
                .await
                .is_ok()
            {
                served += 1;
            }
        }
        assert!(served <= 1, "{served} waiters were served at the old rate");
    }

    #[test]
    fn pause_never_shortens() {
        let l = Limiter::new(60, 1);
        l.pause_for(Duration::from_secs(10));
        l.pause_for(Duration::from_secs(1));
        let remaining = l.pause_deadline().unwrap() - Instant::now();
        assert!(remaining > Duration::from_secs(5));
    }
}
