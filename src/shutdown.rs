//! Graceful shutdown as one small type (after mini-redis's `shutdown.rs`): a [`Trigger`] fires
//! once, every clone of [`Shutdown`] sees it. `run`, the consume loops, the HTTP server and the
//! simulator all listen to the same one. Imports nothing of the crate.

use tokio::sync::watch;

/// Listens for the shutdown signal. Cheap to clone; every clone sees the same signal.
#[derive(Clone, Debug)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// Fires the shutdown signal. Dropping it without firing also counts as shutdown, so a task
/// never outlives whoever was meant to stop it.
#[derive(Debug)]
pub struct Trigger {
    tx: watch::Sender<bool>,
}

impl Shutdown {
    /// A new signal and the trigger that fires it.
    pub fn new() -> (Trigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (Trigger { tx }, Shutdown { rx })
    }

    /// A signal that never fires (its trigger is kept for the life of the process).
    pub fn never() -> Shutdown {
        let (trigger, shutdown) = Shutdown::new();
        std::mem::forget(trigger);
        shutdown
    }

    /// A signal fired by SIGTERM or SIGINT.
    pub fn on_signals() -> Shutdown {
        let (trigger, shutdown) = Shutdown::new();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested");
            trigger.fire();
        });
        shutdown
    }

    /// Whether shutdown has been requested.
    pub fn is_requested(&self) -> bool {
        *self.rx.borrow() || self.rx.has_changed().is_err()
    }

    /// Resolves once shutdown is requested (or its trigger is gone). Cancel-safe.
    pub async fn requested(&mut self) {
        while !*self.rx.borrow() {
            if self.rx.changed().await.is_err() {
                return;
            }
        }
    }
}

impl From<watch::Receiver<bool>> for Shutdown {
    fn from(rx: watch::Receiver<bool>) -> Self {
        Shutdown { rx }
    }
}

impl Trigger {
    pub fn fire(&self) {
        let _ = self.tx.send(true);
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_clone_sees_the_trigger() {
        let (trigger, shutdown) = Shutdown::new();
        let mut a = shutdown.clone();
        let b = shutdown;
        assert!(!b.is_requested());
        let waiter = tokio::spawn(async move { a.requested().await });
        trigger.fire();
        waiter.await.unwrap();
        assert!(b.is_requested());
    }

    #[tokio::test]
    async fn a_dropped_trigger_means_shutdown() {
        let (trigger, mut shutdown) = Shutdown::new();
        drop(trigger);
        shutdown.requested().await;
        assert!(shutdown.is_requested());
    }
}
