//! The command line's vocabulary (SPEC §2): every clap type, and nothing else. The core never
//! sees these; [`super`] turns them into the core's own types.

use crate::config;
use crate::dlq::DlqKind;
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "session-worker",
    version,
    about = "Durable RabbitMQ worker that creates Genesys Cloud Web Messaging guest sessions"
)]
pub struct Cli {
    /// Configuration file layered over the built-in defaults.
    /// (Optional: the defaults are compiled in; `config/default.toml` lists them.)
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Declare the topology, then consume until SIGTERM/SIGINT.
    Run {
        #[arg(long, value_enum, default_value_t = Role::All)]
        role: Role,
    },
    /// Run a local Genesys Cloud API simulator.
    Sim(SimArgs),
    /// Publish session requests from JSON Lines (a file or - for stdin).
    Publish {
        /// JSON Lines file of session requests; `-` (the default) reads standard input.
        #[arg(default_value = "-")]
        input: String,
    },
    /// Inspect, replay and purge the dead-letter queues.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Read the audit trail.
    Audit {
        #[command(subcommand)]
        action: AuditAction,
    },
    /// Manage the broker topology.
    Topology {
        #[command(subcommand)]
        action: TopologyAction,
    },
    /// Load and validate the configuration and print it with secrets redacted.
    CheckConfig,
    /// Serve the operator console (a web page and its JSON API) until SIGTERM/SIGINT.
    Console {
        /// Where to listen (default: console.listen, else 127.0.0.1:9470).
        #[arg(long, num_args = 0..=1, default_missing_value = "127.0.0.1:9470")]
        listen: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum TopologyAction {
    /// Declare exchanges, queues and bindings idempotently, then exit.
    Declare,
}

#[derive(Subcommand, Debug)]
pub enum AuditAction {
    /// The newest entries, oldest first.
    Tail {
        #[arg(short = 'n', default_value_t = 20)]
        n: usize,
        /// Keep printing new entries as they are written.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        format: OutputArgs,
    },
    /// Every entry for one idempotency key.
    Show {
        key: String,
        #[command(flatten)]
        format: OutputArgs,
    },
    /// Entries as JSON Lines (all of them when no bound is given).
    Export {
        /// RFC 3339 time or a duration ago (`24h`).
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
    },
    /// Counts by outcome and latency percentiles.
    Stats {
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
    },
}

/// How a command prints: a table for people (the default), or JSON for machines.
#[derive(clap::Args, Debug, Clone, Copy, Default)]
pub struct OutputArgs {
    /// One JSON object per line, every field.
    #[arg(long)]
    pub json: bool,
    /// One line per row: long text at the end of the line instead of wrapped under it.
    #[arg(long)]
    pub wide: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct DlqFilterArgs {
    /// Which dead-letter queue.
    #[arg(long, value_enum, default_value_t = QueueArg::Worker)]
    pub queue: QueueArg,
    /// Only messages with this x-failure-reason.
    #[arg(long, value_parser = parse_reason)]
    pub reason: Option<String>,
    /// Only the message with this message id.
    #[arg(long)]
    pub id: Option<String>,
    /// Only messages that failed at or after this time (RFC 3339, or a duration ago like `2h`).
    #[arg(long)]
    pub since: Option<String>,
    /// At most this many messages.
    #[arg(long)]
    pub max: Option<usize>,
}

#[derive(Subcommand, Debug)]
pub enum DlqAction {
    /// Show dead-lettered messages without consuming them.
    List {
        #[arg(long, value_enum, default_value_t = QueueArg::Worker)]
        queue: QueueArg,
        /// Only messages with this x-failure-reason.
        #[arg(long, value_parser = parse_reason)]
        reason: Option<String>,
        #[arg(long)]
        limit: Option<usize>,
        #[command(flatten)]
        format: OutputArgs,
    },
    /// Print one message in full, with its idempotency key's audit entries.
    Show {
        id: String,
        #[arg(long, value_enum, default_value_t = QueueArg::Worker)]
        queue: QueueArg,
        /// The message as one JSON object (properties, headers, body).
        #[arg(long)]
        json: bool,
    },
    /// A dry-run replay plan: what each matching message would do (call, replay_stored, held,
    /// needs_force) and how long a replay takes under the budget; saved for `replay --plan`.
    Plan {
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// Only this group (an id the console shows).
        #[arg(long)]
        group: Option<String>,
        /// The plan as one JSON object (with every message).
        #[arg(long)]
        json: bool,
    },
    /// Move matching messages back to their source, each confirmed before removal.
    Replay {
        /// Apply this plan (from `dlq plan` or the console) instead of the filters: in canary
        /// steps, paced under the budget, stopping by itself when too many fail again.
        #[arg(long)]
        plan: Option<String>,
        /// With --plan: the canary steps before the rest.
        #[arg(long, value_delimiter = ',', default_value = "1,10")]
        canary: Vec<usize>,
        /// With --plan: stop when more than this share of the replayed fail again.
        #[arg(long, default_value = "0.5", value_parser = parse_rate)]
        stop_ratio: f64,
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// Messages per second at most.
        #[arg(long)]
        rate: Option<f64>,
        /// Print what would move; move nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also replay `outcome_unknown` messages, after checking in Genesys Cloud that no
        /// session exists: their keys are cleared on every pod and each is sent once more.
        #[arg(long)]
        force: bool,
        /// Who runs this, for the audit entry (default: $USER, $LOGNAME, else the pod's
        /// service account).
        #[arg(long)]
        operator: Option<String>,
    },
    /// Remove matching messages (needs --yes).
    Purge {
        #[command(flatten)]
        filter: DlqFilterArgs,
        #[arg(long)]
        yes: bool,
        /// Who runs this, for the audit entry (default: $USER, $LOGNAME, else the pod's
        /// service account).
        #[arg(long)]
        operator: Option<String>,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    All,
    Worker,
    Forwarder,
}

#[derive(clap::Args, Debug)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8089")]
    pub listen: String,
    /// OAuth client id the token endpoint accepts.
    #[arg(long, default_value = "local-client")]
    pub client_id: String,
    /// OAuth client secret the token endpoint accepts.
    #[arg(long, default_value = "local-secret", env = "SIM_CLIENT_SECRET")]
    pub client_secret: String,
    /// Lifetime of issued access tokens.
    #[arg(long, default_value = "24h", value_parser = config::parse_duration)]
    pub token_ttl: Duration,
    /// Path of the conversations session endpoint.
    #[arg(long, default_value = "/api/v2/conversations/messaging")]
    pub session_path: String,
    /// Open Messaging integration ids that exist (repeatable).
    #[arg(long = "integration-id", default_value = "sim-integration")]
    pub integration_ids: Vec<String>,
    /// Latency added to every session request.
    #[arg(long, default_value = "0ms", value_parser = config::parse_duration)]
    pub latency: Duration,
    /// Create each session, then answer only after this long (a slow Genesys answer).
    #[arg(long, default_value = "0ms", value_parser = config::parse_duration)]
    pub answer_late: Duration,
    /// Fraction of session requests answered 503.
    #[arg(long, default_value = "0", value_parser = parse_rate)]
    pub fail_rate: f64,
    /// Fraction of session requests answered 429.
    #[arg(long, default_value = "0", value_parser = parse_rate)]
    pub throttle_rate: f64,
    /// Session requests allowed per minute (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    pub rate_limit: u32,
    /// Queue ids answered 404 (repeatable).
    #[arg(long = "reject-queue")]
    pub reject_queues: Vec<String>,
    /// Fraction of Guest API starts answered with a TooManyRequestsErrorMessage frame (429),
    /// spread evenly (0.3 throttles starts 4, 7, 10, …), not drawn at random.
    #[arg(long, default_value = "0", value_parser = parse_rate)]
    pub ws_throttle_rate: f64,
    /// Close a guest session's socket right after its first start is written, before the echo.
    #[arg(long)]
    pub ws_drop_after_start: bool,
    /// The only `Origin` the Guest API handshake accepts (others get 403); empty: any.
    #[arg(long, default_value = "")]
    pub allowed_origin: String,
}

/// `--reason`: one of the failure reasons the worker and the forwarder write; a typo would
/// otherwise match nothing, silently.
fn parse_reason(text: &str) -> Result<String, String> {
    crate::event::Reason::parse(text.trim())
        .map(|r| r.as_str().to_string())
        .ok_or_else(|| {
            let known: Vec<&str> = crate::event::Reason::ALL
                .iter()
                .map(|r| r.as_str())
                .collect();
            format!(
                "unknown reason {text:?}; the reasons are: {}",
                known.join(", ")
            )
        })
}

/// `--queue worker|webhook`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueArg {
    /// `amqp.dead_letter_queue`: session requests.
    Worker,
    /// `amqp.webhook_dead_letter_queue`: result events.
    Webhook,
}

impl From<QueueArg> for DlqKind {
    fn from(q: QueueArg) -> Self {
        match q {
            QueueArg::Worker => DlqKind::Worker,
            QueueArg::Webhook => DlqKind::Webhook,
        }
    }
}

/// A fraction between 0 and 1 (the simulator's fault rates).
fn parse_rate(text: &str) -> Result<f64, String> {
    let v: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not between 0.0 and 1.0"))
    }
}

#[cfg(test)]
mod tests {
    use super::parse_rate;

    #[test]
    fn rate_flag_is_checked() {
        assert_eq!(parse_rate("0.25"), Ok(0.25));
        assert!(parse_rate("1.5").is_err());
        assert!(parse_rate("x").is_err());
    }
}
