//! Prometheus metrics (SPEC §8), one registry per process, served at `GET /metrics`.
//!
//! Each failure is counted where it is logged, from the same value, so logs and metrics agree.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::OnceLock;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

pub struct Metrics {
    registry: Registry,
    /// Finished session requests by outcome: started, duplicate, invalid_request, ...
    pub session_requests: Family<OutcomeLabel, Counter>,
    pub genesys_request_duration: Histogram,
    pub rate_limiter_wait: Histogram,
    /// Retries by kind: in_process, delayed, webhook.
    pub retries: Family<KindLabel, Counter>,
    pub dead_lettered: Family<ReasonLabel, Counter>,
    pub idempotent_replays: Counter,
    pub webhook_deliveries: Family<OutcomeLabel, Counter>,
    pub inflight_requests: Gauge,
    pub calls_in_flight: Gauge,
    /// Last `inin-ratelimit-allowed` / `-count` seen from Genesys Cloud.
    pub genesys_ratelimit_allowed: Gauge,
    pub genesys_ratelimit_count: Gauge,
    /// 1 while consumption is paused by an auth failure.
    pub auth_paused: Gauge,
    /// Group commits of the sled store, and how many writers each one made durable.
    pub store_flushes: Counter,
    pub store_flush_waiters: Histogram,
    /// Deliveries requeued because they could not be finished, by pipeline (or `panic`).
    pub delivery_errors: Family<KindLabel, Counter>,
    /// Broker connection trouble seen by the consume shell, by kind (unavailable, lost).
    pub broker_reconnects: Family<KindLabel, Counter>,
    /// Fleet ledger records applied, and skipped as unreadable.
    pub ledger_applied: Counter,
    pub ledger_skipped: Counter,
    /// Values in messages' AMQP headers nested too deep to parse, replaced on arrival
    /// (`amqp::guard`).
    pub header_values_dropped: Counter,
    /// Pods heard from lately (this one included), and this pod's share of the rate budget.
    pub fleet_live_pods: Gauge,
    pub rate_limit_share: Gauge,
    pub rate_limit_held: Gauge,
    /// Calls sent without a usable answer (SPEC §5), and those re-sent by opt-in.
    pub unknown_outcomes: Counter,
    pub unknown_outcome_resends: Counter,
    /// Times the store began failing (disk full, I/O error), whether it fails now, and the
    /// answered outcomes held in memory until the store takes them.
    pub store_failures: Counter,
    pub store_failing: Gauge,
    pub outcomes_held: Gauge,
    /// Records per fleet ledger message (appends are batched).
    pub ledger_batch_records: Histogram,
    /// From appending a claim to knowing its decision; and a ledger append's confirm.
    pub ledger_claim_seconds: Histogram,
    pub ledger_append_seconds: Histogram,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            session_requests: Family::default(),
            genesys_request_duration: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            rate_limiter_wait: Histogram::new(exponential_buckets(0.001, 2.5, 14)),
            retries: Family::default(),
            dead_lettered: Family::default(),
            idempotent_replays: Counter::default(),
            webhook_deliveries: Family::default(),
            inflight_requests: Gauge::default(),
            calls_in_flight: Gauge::default(),
            genesys_ratelimit_allowed: Gauge::default(),
            genesys_ratelimit_count: Gauge::default(),
            auth_paused: Gauge::default(),
            store_flushes: Counter::default(),
            store_flush_waiters: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            delivery_errors: Family::default(),
            broker_reconnects: Family::default(),
            ledger_applied: Counter::default(),
            ledger_skipped: Counter::default(),
            header_values_dropped: Counter::default(),
            fleet_live_pods: Gauge::default(),
            rate_limit_share: Gauge::default(),
            rate_limit_held: Gauge::default(),
            unknown_outcomes: Counter::default(),
            unknown_outcome_resends: Counter::default(),
            store_failures: Counter::default(),
            store_failing: Gauge::default(),
            outcomes_held: Gauge::default(),
            ledger_batch_records: Histogram::new(exponential_buckets(1.0, 2.0, 9)),
            ledger_claim_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            ledger_append_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            registry: Registry::default(),
        };
        m.register_requests(&mut registry);
        m.register_store_and_fleet(&mut registry);
        Metrics { registry, ..m }
    }

    /// The session requests, the Genesys calls, the limiter and the webhook.
    fn register_requests(&self, registry: &mut Registry) {
        registry.register(
            "session_requests",
            "Session requests finished, by outcome",
            self.session_requests.clone(),
        );
        registry.register(
            "genesys_request_duration_seconds",
            "Duration of Genesys Cloud session-create calls",
            self.genesys_request_duration.clone(),
        );
        registry.register(
            "rate_limiter_wait_seconds",
            "Time spent waiting for the token bucket or a 429 pause",
            self.rate_limiter_wait.clone(),
        );
        registry.register(
            "retries",
            "Retries, by kind (in_process, delayed, webhook)",
            self.retries.clone(),
        );
        registry.register(
            "dead_lettered",
            "Messages dead-lettered, by reason",
            self.dead_lettered.clone(),
        );
        registry.register(
            "idempotent_replays",
            "Requests answered from the idempotency store without an API call",
            self.idempotent_replays.clone(),
        );
        registry.register(
            "webhook_deliveries",
            "Webhook delivery attempts, by outcome",
            self.webhook_deliveries.clone(),
        );
        registry.register(
            "inflight_requests",
            "Deliveries being processed now",
            self.inflight_requests.clone(),
        );
        registry.register(
            "calls_in_flight",
            "Session requests calling Genesys Cloud or recording its answer now (at most worker.concurrency)",
            self.calls_in_flight.clone(),
        );
        registry.register(
            "genesys_ratelimit_allowed",
            "Last inin-ratelimit-allowed header from Genesys Cloud",
            self.genesys_ratelimit_allowed.clone(),
        );
        registry.register(
            "genesys_ratelimit_count",
            "Last inin-ratelimit-count header from Genesys Cloud",
            self.genesys_ratelimit_count.clone(),
        );
        registry.register(
            "auth_paused",
            "1 while consumption is paused by a Genesys auth failure",
            self.auth_paused.clone(),
        );
        registry.register(
            "store_flushes",
            "Group commits (flush + fsync) of the sled store",
            self.store_flushes.clone(),
        );
        registry.register(
            "store_flush_waiters",
            "Writers made durable by one group commit",
            self.store_flush_waiters.clone(),
        );
    }

    /// The store, the broker connection and the fleet.
    fn register_store_and_fleet(&self, registry: &mut Registry) {
        registry.register(
            "delivery_errors",
            "Deliveries requeued because they could not be finished (broker or store trouble, or a panic), by pipeline",
            self.delivery_errors.clone(),
        );
        registry.register(
            "broker_reconnects",
            "Broker connections that failed or were lost, by kind (unavailable, lost)",
            self.broker_reconnects.clone(),
        );
        registry.register(
            "ledger_records_applied",
            "Fleet ledger records applied to this pod's store",
            self.ledger_applied.clone(),
        );
        registry.register(
            "ledger_records_skipped",
            "Fleet ledger records skipped because this version cannot read them",
            self.ledger_skipped.clone(),
        );
        registry.register(
            "amqp_header_values_dropped",
            "Values in AMQP message headers nested deeper than the limit, replaced by a note before parsing",
            self.header_values_dropped.clone(),
        );
        registry.register(
            "fleet_live_pods",
            "Worker pods heard from within the last few seconds, this one included",
            self.fleet_live_pods.clone(),
        );
        registry.register(
            "rate_limit_share_per_minute",
            "This pod's share of rate_limit.requests_per_minute",
            self.rate_limit_share.clone(),
        );
        registry.register(
            "rate_limit_held",
            "1 while this pod holds its calls because the other pods cannot hear it (it has not heard its own heartbeat through the fleet exchange lately, or not yet)",
            self.rate_limit_held.clone(),
        );
        registry.register(
            "unknown_outcomes",
            "Session calls sent without a usable answer: recorded unknown, dead-lettered outcome_unknown",
            self.unknown_outcomes.clone(),
        );
        registry.register(
            "store_failures",
            "Times the store began failing writes (disk full, I/O error); intake pauses until it recovers",
            self.store_failures.clone(),
        );
        registry.register(
            "store_failing",
            "1 while the store fails writes (intake paused, /readyz not ready)",
            self.store_failing.clone(),
        );
        registry.register(
            "outcomes_held",
            "Answered session outcomes held in memory until the failing store takes them",
            self.outcomes_held.clone(),
        );
        registry.register(
            "unknown_outcome_resends",
            "Calls with an unknown outcome re-sent because genesys.retry_unknown_outcome is on",
            self.unknown_outcome_resends.clone(),
        );
        registry.register(
            "ledger_claim_seconds",
            "Time from appending a claim to the fleet ledger to knowing its decision",
            self.ledger_claim_seconds.clone(),
        );
        registry.register(
            "ledger_append_seconds",
            "Time a fleet ledger append waits for the broker's confirm",
            self.ledger_append_seconds.clone(),
        );
        registry.register(
            "ledger_batch_records",
            "Records carried by one fleet ledger message",
            self.ledger_batch_records.clone(),
        );
    }

    pub fn outcome(&self, outcome: &str) {
        self.session_requests
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn dead_letter(&self, reason: &str) {
        self.dead_lettered
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn retry(&self, kind: &str) {
        self.retries
            .get_or_create(&KindLabel {
                kind: kind.to_string(),
            })
            .inc();
    }

    pub fn delivery_error(&self, kind: &str) {
        self.delivery_errors
            .get_or_create(&KindLabel {
                kind: kind.to_string(),
            })
            .inc();
    }

    pub fn broker_reconnect(&self, kind: &str) {
        self.broker_reconnects
            .get_or_create(&KindLabel {
                kind: kind.to_string(),
            })
            .inc();
    }

    pub fn webhook(&self, outcome: &str) {
        self.webhook_deliveries
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn limiter_wait(&self, d: Duration) {
        self.rate_limiter_wait.observe(d.as_secs_f64());
    }

    /// Prometheus text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The process-wide metrics. Every series an alert watches exists from the first scrape (at
/// zero), so a rate over it works on a fresh pod.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let m = Metrics::new();
        for reason in crate::event::Reason::ALL {
            let _ = m.dead_lettered.get_or_create(&ReasonLabel {
                reason: reason.as_str().to_string(),
            });
        }
        for kind in ["in_process", "delayed", "webhook"] {
            let _ = m.retries.get_or_create(&KindLabel {
                kind: kind.to_string(),
            });
        }
        for outcome in ["started", "duplicate", "retry_scheduled"] {
            let _ = m.session_requests.get_or_create(&OutcomeLabel {
                outcome: outcome.to_string(),
            });
        }
        for outcome in ["delivered", "retry_scheduled", "dead_lettered"] {
            let _ = m.webhook_deliveries.get_or_create(&OutcomeLabel {
                outcome: outcome.to_string(),
            });
        }
        m
    })
}

/// Counts a delivery as in flight for as long as it lives.
pub struct InflightGuard;

impl InflightGuard {
    pub fn new() -> Self {
        metrics().inflight_requests.inc();
        InflightGuard
    }
}

impl Default for InflightGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        metrics().inflight_requests.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_spec_names() {
        let m = metrics();
        m.outcome("started");
        m.dead_letter("invalid_request");
        m.retry("in_process");
        m.webhook("delivered");
        m.idempotent_replays.inc();
        m.genesys_request_duration.observe(0.05);
        m.limiter_wait(Duration::from_millis(3));
        let _g = InflightGuard::new();
        let text = m.encode();
        for name in [
            "session_requests_total{outcome=\"started\"}",
            "genesys_request_duration_seconds_bucket",
            "rate_limiter_wait_seconds_count",
            "retries_total{kind=\"in_process\"}",
            "dead_lettered_total{reason=\"invalid_request\"}",
            "idempotent_replays_total",
            "webhook_deliveries_total{outcome=\"delivered\"}",
            "inflight_requests",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }

    #[test]
    fn the_series_alerts_watch_exist_before_anything_happens() {
        let text = Metrics::new().encode();
        assert!(
            !text.contains("dead_lettered_total{"),
            "a bare registry has none"
        );
        let text = metrics().encode();
        for name in [
            "dead_lettered_total{reason=\"retries_exhausted\"}",
            "dead_lettered_total{reason=\"outcome_unknown\"}",
            "retries_total{kind=\"delayed\"}",
            "webhook_deliveries_total{outcome=\"dead_lettered\"}",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
