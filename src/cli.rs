//! The command line (SPEC §2). Parses arguments, loads configuration, runs the command, and maps
//! the outcome to an exit code: 0 ok, 1 runtime failure, 2 usage or configuration error.

use crate::config::{self, Settings};
use crate::dlq::DlqKind;
use crate::health::Health;
use crate::sim::{self, AuthMode, Faults, SimOptions};
use crate::store::Store;
use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

pub const EXIT_OK: i32 = 0;
pub const EXIT_RUNTIME: i32 = 1;
pub const EXIT_USAGE: i32 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "session-worker",
    version,
    about = "Durable RabbitMQ worker that creates Genesys Cloud Web Messaging guest sessions"
)]
pub struct Cli {
    /// Configuration file layered over the built-in defaults.
    #[arg(long, global = true, default_value = "config/default.toml")]
    pub config: PathBuf,
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
    },
    /// Every entry for one idempotency key.
    Show { key: String },
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

#[derive(clap::Args, Debug, Clone)]
pub struct DlqFilterArgs {
    /// Which dead-letter queue.
    #[arg(long, value_enum, default_value_t = DlqKind::Worker)]
    pub queue: DlqKind,
    /// Only messages with this x-failure-reason.
    #[arg(long)]
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
        #[arg(long, value_enum, default_value_t = DlqKind::Worker)]
        queue: DlqKind,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        limit: Option<usize>,
        /// One JSON object per message and line.
        #[arg(long)]
        json: bool,
    },
    /// Print one message in full.
    Show {
        id: String,
        #[arg(long, value_enum, default_value_t = DlqKind::Worker)]
        queue: DlqKind,
    },
    /// Move matching messages back to their source, each confirmed before removal.
    Replay {
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// Messages per second at most.
        #[arg(long)]
        rate: Option<f64>,
        /// Print what would move; move nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove matching messages (needs --yes).
    Purge {
        #[command(flatten)]
        filter: DlqFilterArgs,
        #[arg(long)]
        yes: bool,
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
    /// Fraction of session requests answered 503.
    #[arg(long, default_value = "0", value_parser = sim::parse_rate)]
    pub fail_rate: f64,
    /// Fraction of session requests answered 429.
    #[arg(long, default_value = "0", value_parser = sim::parse_rate)]
    pub throttle_rate: f64,
    /// Session requests allowed per minute (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    pub rate_limit: u32,
    /// Queue ids answered 404 (repeatable).
    #[arg(long = "reject-queue")]
    pub reject_queues: Vec<String>,
}

/// Parse, run, and return the exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
            let _ = e.print();
            return code;
        }
    };
    crate::telemetry::init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return EXIT_RUNTIME;
        }
    };
    runtime.block_on(dispatch(cli))
}

async fn dispatch(cli: Cli) -> i32 {
    let config_path = cli.config.clone();
    let load = || Settings::load(Some(&config_path));
    match cli.command {
        Command::Sim(args) => report(run_sim(args).await),
        Command::CheckConfig => match load() {
            Ok(settings) => match settings.to_redacted_toml() {
                Ok(text) => {
                    println!("# effective configuration (secrets redacted)\n{text}");
                    EXIT_OK
                }
                Err(e) => config_error(&e),
            },
            Err(e) => config_error(&e),
        },
        Command::Topology {
            action: TopologyAction::Declare,
        } => match load() {
            Ok(settings) => report(declare_topology(&settings).await),
            Err(e) => config_error(&e),
        },
        Command::Run { role } => match load() {
            Ok(settings) => {
                if role == Role::Forwarder && settings.webhook.url.trim().is_empty() {
                    eprintln!("error: webhook.url is empty, so `run --role forwarder` has nothing to do; set ANALYTICS_WEBHOOK_URL or webhook.url");
                    return EXIT_USAGE;
                }
                report(run_worker(settings, role).await)
            }
            Err(e) => config_error(&e),
        },
        Command::Publish { input } => match load() {
            Ok(settings) => run_publish(&settings, &input).await,
            Err(e) => config_error(&e),
        },
        Command::Dlq { action } => match load() {
            Ok(settings) => crate::ops::dlq_command(&settings, action).await,
            Err(e) => config_error(&e),
        },
        Command::Audit { action } => match load() {
            Ok(settings) => crate::ops::audit_command(&settings, action).await,
            Err(e) => config_error(&e),
        },
    }
}

fn config_error(e: &config::ConfigError) -> i32 {
    eprintln!("error: {e}");
    EXIT_USAGE
}

fn report(result: anyhow::Result<()>) -> i32 {
    match result {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("error: {e:#}");
            EXIT_RUNTIME
        }
    }
}

/// A channel that turns true on SIGTERM or SIGINT.
fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested");
        let _ = tx.send(true);
    });
    rx
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

async fn run_sim(args: SimArgs) -> anyhow::Result<()> {
    let opts = SimOptions {
        listen: args.listen,
        client_id: args.client_id,
        client_secret: args.client_secret,
        token_ttl: args.token_ttl,
        session_path: args.session_path,
        integration_ids: args.integration_ids,
        faults: Faults {
            latency_ms: args.latency.as_millis() as u64,
            fail_rate: args.fail_rate,
            throttle_rate: args.throttle_rate,
            rate_limit_per_minute: args.rate_limit,
            reject_queues: args.reject_queues,
            auth: AuthMode::Normal,
        },
    };
    let mut rx = shutdown_signal();
    sim::serve(opts, async move {
        crate::worker::shutdown_requested(&mut rx).await;
    })
    .await?;
    Ok(())
}

async fn run_publish(settings: &Settings, input: &str) -> i32 {
    let reader = match crate::publish::open_input(input) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    match crate::publish::publish(settings, reader, input).await {
        Ok(summary) => {
            println!("{}", summary.line());
            if summary.invalid > 0 {
                eprintln!(
                    "error: {} invalid line(s) were not published: {}",
                    summary.invalid,
                    summary
                        .invalid_lines
                        .iter()
                        .map(|(n, _)| n.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                EXIT_RUNTIME
            } else {
                EXIT_OK
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_RUNTIME
        }
    }
}

async fn declare_topology(settings: &Settings) -> anyhow::Result<()> {
    let conn = crate::amqp::connect(&settings.amqp, "session-worker topology").await?;
    let ch = conn
        .create_channel()
        .await
        .context("Failed to open a channel")?;
    crate::amqp::topology::declare(&ch, &settings.amqp).await?;
    let _ = conn.close(200, "done".into()).await;
    for q in crate::amqp::topology::queue_names(&settings.amqp) {
        println!("queue {q}");
    }
    for x in crate::amqp::topology::exchange_names(&settings.amqp) {
        println!("exchange {x}");
    }
    println!("topology declared");
    Ok(())
}

async fn run_worker(settings: Settings, role: Role) -> anyhow::Result<()> {
    let settings = Arc::new(settings);
    let store =
        Store::open(&settings.store.path, settings.store.idempotency_ttl).with_context(|| {
            format!(
                "Failed to open the store at {}",
                settings.store.path.display()
            )
        })?;
    let health = Arc::new(Health::default());
    health.set_store_open(true);
    let listener = crate::http::bind(&settings.http.listen).await?;
    let shutdown = shutdown_signal();
    let http = {
        let mut rx = shutdown.clone();
        tokio::spawn(crate::http::serve(
            listener,
            health.clone(),
            store.clone(),
            async move {
                crate::worker::shutdown_requested(&mut rx).await;
            },
        ))
    };
    match role {
        Role::Worker => crate::worker::run(settings, store, health, shutdown).await?,
        Role::Forwarder => crate::webhook::run(settings, store, health, shutdown).await?,
        Role::All => {
            let forwarder = tokio::spawn(crate::webhook::run(
                settings.clone(),
                store.clone(),
                health.clone(),
                shutdown.clone(),
            ));
            let worker = crate::worker::run(settings, store, health, shutdown).await;
            let forwarded = forwarder.await.context("webhook forwarder task failed")?;
            worker?;
            forwarded?;
        }
    }
    http.abort();
    Ok(())
}
