//! session-worker: a durable RabbitMQ job-queue worker that creates Genesys Cloud Web Messaging
//! guest sessions.
//!
//! The map, top to bottom. Imports only ever point down this list.
//!
//! **Command line**
//! - [`cli`]: parsing, exit codes, dispatch; the only place that knows clap and `anyhow`.
//!
//! **Operations** (what operators and producers run)
//! - [`dlq`]: list, show, replay and purge the dead-letter queues.
//! - [`audit`]: read the audit trail, from the store or through the running worker.
//! - [`admin`]: the running worker's admin endpoint, an owner-only Unix socket.
//! - [`publish`]: the producer tool, validating with the worker's own code.
//! - [`console`]: the operator console, a web page and its JSON API over the DLQs and the
//!   audit trail (bearer tokens, never on `http.listen`).
//! - `sim`: a local Genesys Cloud simulator for development and tests, behind the `sim` cargo
//!   feature (on by default; the production image is built without it, docs/deployment.md).
//!
//! **Pipelines** (what `run` runs; each a [`amqp::shell::Pipeline`])
//! - [`worker`]: a session request through intake → claim → call → finish.
//! - [`webhook`]: the forwarder delivering result events to the analytics endpoint, signed.
//!
//! **Fleet**
//! - [`fleet`]: the ledger stream every pod appends claims and outcomes to and applies in order.
//!
//! **Infrastructure**
//! - [`amqp`]: broker connection, topology, the consume loop and the shell pipelines run in.
//! - [`store`]: sled: idempotency records, the audit trail, group-committed flushes.
//! - [`genesys`]: OAuth2 tokens and session creation, behind one seam with two backends.
//! - [`limiter`]: the process-wide governor token bucket and the 429 pause.
//! - [`http`], [`health`], [`metrics`]: `/healthz`, `/readyz`, `/metrics`.
//! - [`internal_events`]: one function per thing operators are told, logged and counted.
//! - [`request`], [`event`]: the message contract (session request in, result event out,
//!   failure reasons).
//! - [`config`]: layered settings (defaults, `--config`, environment), validated on load.
//!
//! **Helpers** (import nothing of the crate, or only each other)
//! - [`shutdown`], [`text`], [`http_headers`], [`backoff`], [`secret`], [`telemetry`].

pub mod cli;

pub mod admin;
pub mod audit;
pub mod console;
pub mod dlq;
pub mod publish;
#[cfg(feature = "sim")]
pub mod sim;

pub mod webhook;
pub mod worker;

pub mod fleet;

pub mod amqp;
pub mod config;
pub mod event;
pub mod genesys;
pub mod health;
pub mod http;
pub mod internal_events;
pub mod limiter;
pub mod metrics;
pub mod request;
pub mod store;

pub mod backoff;
pub mod http_headers;
pub mod secret;
pub mod shutdown;
pub mod telemetry;
pub mod text;
