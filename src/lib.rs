//! session-worker: a durable RabbitMQ job-queue worker that creates Genesys Cloud Web Messaging
//! guest sessions.
//!
//! A tour of the modules, in the order a session request meets them:
//!
//! - [`config`]: layered settings (defaults file, `--config`, environment), validated on load.
//! - [`amqp`]: broker connection and the topology (exchanges, queues, retry and dead-letter queues).
//! - [`request`]: the session request, its validation and its idempotency key.
//! - [`store`]: sled: idempotency records, the audit trail, group-committed flushes.
//! - [`limiter`]: the process-wide governor token bucket and the 429 pause.
//! - [`genesys`]: OAuth2 tokens and session creation, behind one seam with two backends.
//! - [`worker`]: the consumer pipeline tying all of the above together.
//! - [`event`]: the result event published to `session.results`.
//! - [`webhook`]: the forwarder delivering result events to the analytics endpoint, signed.
//! - [`publish`]: the producer tool, validating with the worker's own code.
//! - [`dlq`], [`audit`]: operator tools for dead letters and the audit trail.
//! - [`http`], [`metrics`], [`health`]: `/healthz`, `/readyz`, `/metrics`.
//! - [`sim`]: a local Genesys Cloud simulator for development and tests.
//! - [`cli`]: the command line (`run`, `sim`, `topology declare`, `check-config`, ...).
//!
//! Supporting modules: [`secret`] (values that cannot print themselves), [`backoff`],
//! [`telemetry`].

pub mod amqp;
pub mod audit;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod dlq;
pub mod event;
pub mod genesys;
pub mod health;
pub mod http;
pub mod limiter;
pub mod metrics;
pub mod ops;
pub mod publish;
pub mod request;
pub mod secret;
pub mod sim;
pub mod store;
pub mod telemetry;
pub mod webhook;
pub mod worker;
