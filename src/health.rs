//! Liveness and readiness state shared by the worker, the forwarder and the HTTP endpoints.

use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Default)]
pub struct Health {
    broker_connected: AtomicBool,
    store_open: AtomicBool,
    auth_paused: AtomicBool,
    /// Set once the fleet ledger reader has caught up; cleared while it is disconnected.
    ledger_ready: AtomicBool,
    /// Whether this process runs a ledger reader at all (the forwarder alone does not).
    ledger_used: AtomicBool,
    /// Why the last connection attempt failed (0: it did not), as `BrokerProblem` codes.
    broker_problem: std::sync::atomic::AtomicU8,
    /// Why the store fails writes, while it does.
    store_failure: std::sync::Mutex<Option<String>>,
}

/// Why the broker cannot be reached, for `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerProblem {
    Unreachable = 1,
    LoginRefused = 2,
    NoVhost = 3,
}

impl Health {
    pub fn set_broker_connected(&self, v: bool) {
        self.broker_connected.store(v, Ordering::Relaxed);
        if v {
            self.broker_problem.store(0, Ordering::Relaxed);
        }
    }

    /// The last connection attempt failed for this reason.
    pub fn set_broker_problem(&self, problem: BrokerProblem) {
        self.broker_problem.store(problem as u8, Ordering::Relaxed);
    }
    pub fn set_store_open(&self, v: bool) {
        self.store_open.store(v, Ordering::Relaxed);
    }
    /// The store fails writes (`Some(why)`), or takes them again (`None`).
    pub fn set_store_failure(&self, why: Option<String>) {
        *self.store_failure.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }
    pub fn set_auth_paused(&self, v: bool) {
        self.auth_paused.store(v, Ordering::Relaxed);
    }
    pub fn set_ledger_ready(&self, v: bool) {
        self.ledger_used.store(true, Ordering::Relaxed);
        self.ledger_ready.store(v, Ordering::Relaxed);
    }
    pub fn auth_paused(&self) -> bool {
        self.auth_paused.load(Ordering::Relaxed)
    }

    /// Why the process is not ready; empty when it is.
    pub fn not_ready_reasons(&self) -> Vec<String> {
        let mut reasons: Vec<String> = Vec::new();
        if !self.broker_connected.load(Ordering::Relaxed) {
            reasons.push(match self.broker_problem.load(Ordering::Relaxed) {
                2 => "broker refused the login (check the user and password in amqp.url)",
                3 => "broker has no such virtual host, or the user may not use it (check amqp.url)",
                1 => "broker unreachable (see the logs for why)",
                _ => "broker not connected",
            }
            .into());
        }
        if !self.store_open.load(Ordering::Relaxed) {
            reasons.push("store not open".into());
        }
        if let Some(why) = &*self.store_failure.lock().unwrap_or_else(|p| p.into_inner()) {
            reasons.push(format!(
                "store fails writes ({why}); intake paused, answered outcomes held; resumes by itself once a write succeeds (free space on the volume)"
            ));
        }
        if self.ledger_used.load(Ordering::Relaxed) && !self.ledger_ready.load(Ordering::Relaxed) {
            reasons.push("fleet ledger not caught up (catching up after start, or the ledger stream is unreachable)".into());
        }
        if self.auth_paused() {
            reasons.push(
                "paused: Genesys Cloud refused the credentials (see logs for the fix)".into(),
            );
        }
        reasons
    }

    pub fn ready(&self) -> bool {
        self.not_ready_reasons().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_needs_everything() {
        let h = Health::default();
        assert!(!h.ready());
        h.set_broker_connected(true);
        h.set_store_open(true);
        assert!(h.ready());
        h.set_auth_paused(true);
        assert_eq!(h.not_ready_reasons().len(), 1);
        assert!(!h.ready());
        h.set_auth_paused(false);
        h.set_store_failure(Some("No space left on device".into()));
        assert!(h.not_ready_reasons()[0].contains("No space left on device"));
        h.set_store_failure(None);
        assert!(h.ready());
    }

    #[test]
    fn a_pod_that_reads_the_ledger_is_ready_only_once_caught_up() {
        let h = Health::default();
        h.set_broker_connected(true);
        h.set_store_open(true);
        h.set_ledger_ready(false);
        assert!(h
            .not_ready_reasons()
            .iter()
            .any(|r| r.contains("fleet ledger not caught up")));
        h.set_ledger_ready(true);
        assert!(h.ready());
    }
}
