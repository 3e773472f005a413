//! The call permit: one of the `worker.concurrency` places for a Genesys call, held from the
//! call through the recording of its answer ([`super::call`] takes it, [`super::outcome`]
//! lets it go once the answer is durable).

use crate::metrics::metrics;

/// One of the `worker.concurrency` call permits, counted in `calls_in_flight` while held.
pub struct CallPermit<'a> {
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl<'a> CallPermit<'a> {
    pub fn new(permit: tokio::sync::SemaphorePermit<'a>) -> Self {
        metrics().calls_in_flight.inc();
        Self { _permit: permit }
    }
}

impl Drop for CallPermit<'_> {
    fn drop(&mut self) {
        metrics().calls_in_flight.dec();
    }
}
