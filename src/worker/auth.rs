//! The auth gate: a task whose call Genesys refused for credentials trips it; the consume loop
//! stops taking deliveries, the pod reports not-ready, and Genesys Cloud is probed with back-off
//! (the token endpoint; for Web Messaging also the Guest API handshake) until it works again
//! (SPEC §5).

use crate::genesys::GenesysClient;
use crate::health::Health;
use crate::internal_events;
use crate::shutdown::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

const FIRST_PROBE: Duration = Duration::from_secs(5);
const MAX_PROBE: Duration = Duration::from_secs(300);

pub struct AuthGate {
    tripped: AtomicBool,
    /// The consume loop's interrupt, shared with the store watch.
    notify: Arc<Notify>,
    /// Consecutive pauses without a successful session in between; grows the probe back-off.
    streak: AtomicU32,
}

impl AuthGate {
    pub fn new(notify: Arc<Notify>) -> Self {
        Self {
            tripped: AtomicBool::new(false),
            notify,
            streak: AtomicU32::new(0),
        }
    }

    pub fn tripped(&self) -> bool {
        self.tripped.load(Ordering::SeqCst)
    }

    /// Stop consuming (once, however many tasks trip it).
    pub fn trip(&self) {
        if !self.tripped.swap(true, Ordering::SeqCst) {
            self.notify.notify_one();
        }
    }

    /// A session went through: the next pause starts from the shortest probe delay.
    pub fn succeeded(&self) {
        self.streak.store(0, Ordering::Relaxed);
    }

    /// Paused: not ready, probe the token endpoint with back-off. Returns false if shutdown was
    /// requested meanwhile.
    pub async fn pause(
        &self,
        client: &GenesysClient,
        health: &Health,
        shutdown: &mut Shutdown,
    ) -> bool {
        health.set_auth_paused(true);
        let streak = self.streak.fetch_add(1, Ordering::SeqCst);
        let mut wait = crate::backoff::ceiling(streak, FIRST_PROBE, MAX_PROBE);
        internal_events::auth_paused(wait, client.backend().auth_hint());
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.requested() => return false,
            }
            match client.probe().await {
                Ok(()) => {
                    self.tripped.store(false, Ordering::SeqCst);
                    health.set_auth_paused(false);
                    internal_events::auth_resumed();
                    return true;
                }
                Err(e) => {
                    wait = (wait * 2).min(MAX_PROBE);
                    tracing::error!(error = %e, probe_in_s = wait.as_secs(), "still paused");
                }
            }
        }
    }
}
