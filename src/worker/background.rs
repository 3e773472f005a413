//! The worker's tasks beside the consume loop: a fleet task that stops the consumer when it
//! ends for good, the pause on store failures, the shutdown that follows both, and pruning.

use crate::shutdown::Shutdown;
use crate::store::Store;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// Run one of the worker's fleet tasks; if it ends with an error, log it and say so on
/// `gone_for_good`, which stops the consumer.
pub(super) async fn stop_for_good<E: std::fmt::Display>(
    task: impl std::future::Future<Output = Result<(), E>>,
    what: &'static str,
    gone_for_good: tokio::sync::mpsc::Sender<()>,
) -> Result<(), E> {
    let ended = task.await;
    if let Err(e) = &ended {
        tracing::error!(error = %e, "{what}");
        let _ = gone_for_good.try_send(());
    }
    ended
}

/// Stop taking deliveries whenever the store begins failing writes.
pub(super) async fn pause_on_store_failure(
    mut failures: tokio::sync::watch::Receiver<Option<String>>,
    interrupt: Arc<Notify>,
) {
    while failures.changed().await.is_ok() {
        if failures.borrow_and_update().is_some() {
            interrupt.notify_one();
        }
    }
}

/// A shutdown that fires with `outer`, or when a fleet task reports it is gone for good.
pub(super) fn stop_when(outer: Shutdown, mut fatal: tokio::sync::mpsc::Receiver<()>) -> Shutdown {
    let (stop_consumer, shutdown_or_fatal) = Shutdown::new();
    let mut outer = outer;
    tokio::spawn(async move {
        let failed = async {
            if fatal.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = outer.requested() => {}
            _ = failed => {}
        }
        stop_consumer.fire();
    });
    shutdown_or_fatal
}

pub(super) async fn prune_loop(store: Store, audit_retention: Duration) {
    let mut tick = tokio::time::interval(Duration::from_secs(600));
    loop {
        tick.tick().await;
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.prune(audit_retention)).await {
            Ok(Ok((records, entries))) if records + entries > 0 => {
                tracing::info!(
                    records,
                    audit_entries = entries,
                    "pruned expired idempotency records and audit entries"
                );
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "pruning the store failed"),
            Err(e) => tracing::error!(error = %e, "pruning task failed"),
        }
    }
}
